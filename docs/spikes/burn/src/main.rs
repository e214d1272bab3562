//! Spike: burn 0.22.1 (ndarray backend) against gpuwasm-tensor's CPU
//! linear layer, on MiniLM's shapes, in the same process.
use burn::tensor::{Tensor, TensorData};
use std::time::Instant;

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < 2.0 { f(); n += 1; }
    t.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn main() {
    let device = Default::default();
    for (m, k, n) in [(16usize, 384usize, 1152usize), (16, 1536, 384), (544, 384, 1536), (512, 512, 512)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let ours = time(|| { std::hint::black_box(gpuwasm_tensor::cpu::linear(&x, m, k, &w, n, None)); });
        let bx: Tensor<2> = Tensor::from_data(TensorData::new(x.clone(), [m, k]), &device);
        let bw: Tensor<2> = Tensor::from_data(TensorData::new(w.clone(), [n, k]), &device).transpose();
        let theirs = time(|| { std::hint::black_box(bx.clone().matmul(bw.clone()).to_data().to_vec::<f32>().unwrap()); });
        println!("{m}x{k}x{n}: gpuwasm-tensor {ours:.3} ms, burn-ndarray {theirs:.3} ms, ratio {:.2}", theirs / ours);
    }
}
