//! Choosing the next token from a sequence's logits: logit bias,
//! repetition, presence and frequency penalties, temperature, top-k,
//! top-p and min-p, with a seeded generator of its own per sequence (the
//! same seed gives the same tokens). Temperature 0 is greedy.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How a sequence samples (OpenAI's and llama.cpp's parameters).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0: always the most likely token.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (1: all).
    pub top_p: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already in
    /// the sequence (1: none).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of the tokens named.
    pub logit_bias: HashMap<u32, f32>,
    /// Seed of the sequence's generator (`None`: from the clock).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: None,
        }
    }
}

/// Tokens one generation may bias: each step of the shared engine pays
/// for them.
pub const MAX_BIASES: usize = 1024;

impl SamplingParams {
    /// Checks the values are in their ranges, and the biased tokens in a
    /// `vocab`-token vocabulary (at most [`MAX_BIASES`] of them); names the
    /// first that is not, with its range (`NAME: ...`, OpenAI's names).
    pub fn check(&self, vocab: usize) -> Result<(), String> {
        if self.logit_bias.len() > MAX_BIASES {
            return Err(format!("logit_bias: {} tokens, at most {MAX_BIASES}", self.logit_bias.len()));
        }
        if let Some(token) = self.logit_bias.keys().find(|t| **t as usize >= vocab) {
            return Err(format!("logit_bias: token {token} is not in the {vocab}-token vocabulary"));
        }
        let bad = |name: &str, v: f32, range: &str| Err(format!("{name}: {v} is out of range: {range}"));
        if !(0.0..=100.0).contains(&self.temperature) {
            return bad("temperature", self.temperature, "0 to 100 (0: greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "above 0, at most 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "0 to 1");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 100.0) {
            return bad("repetition_penalty", self.repetition_penalty, "above 0, at most 100 (1: off)");
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-100.0..=100.0).contains(&v) {
                return bad(name, v, "-100 to 100");
            }
        }
        match self.logit_bias.values().find(|b| !(-100.0..=100.0).contains(*b)) {
            Some(b) => bad("logit_bias", *b, "-100 to 100"),
            None => Ok(()),
        }
    }
}

/// One sequence's sampler: its parameters and generator.
pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        Sampler { state: seed ^ 0x9e37_79b9_7f4a_7c15, params }
    }

    /// The next random number in [0, 1) (splitmix64).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token from `logits`, given the sequence's `prompt` and the
    /// tokens it `generated` so far.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> u32 {
        let p = &self.params;
        for (&token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = prompt.iter().chain(generated).copied().collect();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let greedy = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i as u32);
        if p.temperature == 0.0 {
            return greedy();
        }
        // Candidates, most likely first.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let top = logits[order[0] as usize] as f64;
        let mut probs: Vec<f64> = order.iter().map(|&t| ((logits[t as usize] as f64 - top) / p.temperature as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|q| **q >= floor).count().max(1);
            probs.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut sum = 0.0;
            let keep = probs.iter().take_while(|q| {
                let before = sum;
                sum += **q;
                before < p.top_p as f64
            });
            let keep = keep.count().max(1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut pick = self.uniform() * total;
        for (i, q) in probs.iter().enumerate() {
            if pick < *q {
                return order[i];
            }
            pick -= q;
        }
        order[probs.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_penalties_move_it() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[], &[]), 1);
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[1], &[]), 2, "3.0 / 2 < 2.9");
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, frequency_penalty: 0.1, ..Default::default() });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[], &[1, 1]), 2, "3.0 - 2 * 0.1 < 2.9");
        let bias = [(0u32, 5.0f32)].into();
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, logit_bias: bias, ..Default::default() });
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[], &[]), 0);
    }

    #[test]
    fn seeds_repeat_and_filters_bound_the_choice() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let run = |params: SamplingParams| {
            let mut s = Sampler::new(params);
            (0..40).map(|_| s.sample(&mut logits.clone(), &[], &[])).collect::<Vec<u32>>()
        };
        let seeded = SamplingParams { temperature: 0.8, seed: Some(7), ..Default::default() };
        assert_eq!(run(seeded.clone()), run(seeded.clone()), "same seed, same tokens");
        assert_ne!(run(seeded.clone()), run(SamplingParams { seed: Some(8), ..seeded.clone() }), "another seed, other tokens");
        let mut ranked: Vec<u32> = (0..50).collect();
        ranked.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        let top3 = run(SamplingParams { top_k: 3, ..seeded.clone() });
        assert!(top3.iter().all(|t| ranked[..3].contains(t)), "top-k 3: {top3:?}");
        assert!(top3.iter().collect::<std::collections::HashSet<_>>().len() > 1, "and still random");
        let narrow = run(SamplingParams { top_p: 1e-6, ..seeded.clone() });
        assert!(narrow.iter().all(|t| *t == ranked[0]), "top-p near 0 keeps the best only");
        let min = run(SamplingParams { min_p: 0.999, ..seeded });
        assert!(min.iter().all(|t| *t == ranked[0]), "min-p near 1 keeps the best only");
    }

    #[test]
    fn parameters_are_checked() {
        assert!(SamplingParams::default().check(10).is_ok());
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.check(10).unwrap_err();
        assert!(e.contains("top_p"), "{e}");
        assert!(SamplingParams { temperature: f32::NAN, ..Default::default() }.check(10).is_err());
        let e = SamplingParams { logit_bias: [(10, 1.0)].into(), ..Default::default() }.check(10).unwrap_err();
        assert!(e.contains("token 10 is not in the 10-token vocabulary"), "{e}");
    }
}
