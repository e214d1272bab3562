//! The engine against real models: all-MiniLM-L6-v2 against
//! sentence-transformers' embeddings, SmolLM2's GGUF file.

use gpuwasm_tensor::backend::{Devices, SharedBackend};
use gpuwasm_tensor::{Budget, Format, ModelFiles, Tensor, bert, gguf};

/// Trusted test models run without a memory limit.
fn unlimited() -> Budget {
    Budget::unlimited()
}

/// The CPU backend.
fn cpu() -> SharedBackend {
    Devices::cpu_only().cpu().clone()
}

mod common;
use common::backends;

#[path = "../../tests/test_models.rs"]
mod test_models;
use test_models::model_path;

fn minilm_files() -> ModelFiles {
    let dir = model_path("minilm");
    bert::FILES
        .iter()
        .filter_map(|f| std::fs::read(dir.join(f)).ok().map(|bytes| (f.to_string(), bytes.into())))
        .collect()
}

#[derive(serde::Deserialize)]
struct Fixture {
    sentences: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("../../tests/fixtures/minilm-embeddings.json")).expect("fixture parses");
    assert!(fixture.sentences.len() >= 50);
    let texts: Vec<&str> = fixture.sentences.iter().map(String::as_str).collect();
    for backend in backends() {
        let kind = format!("{} ({})", backend.info().kind.name(), backend.info().driver);
        let graph = gpuwasm_tensor::load(Format::Safetensors, &minilm_files(), backend).expect("MiniLM loads");

        // All at once (one packed batch) and a few alone must agree with the reference.
        let out = graph.run(vec![("text".into(), Tensor::texts(&texts))], &unlimited()).unwrap();
        assert_eq!(out[0].0, "embeddings");
        assert_eq!(out[0].1.shape(), &[texts.len(), 384]);
        let vectors = out[0].1.as_f32("embeddings").unwrap();
        let mut worst = 1.0f32;
        for (i, reference) in fixture.embeddings.iter().enumerate() {
            let c = cosine(&vectors[i * 384..(i + 1) * 384], reference);
            assert!(c >= 0.999, "{kind}: sentence {i} {:?}: cosine {c}", texts[i]);
            worst = worst.min(c);
        }
        eprintln!("{kind}: worst cosine over {} sentences: {worst:.6}", texts.len());
        for i in [0, 37, 49] {
            let alone = graph.run(vec![("text".into(), Tensor::texts(&texts[i..=i]))], &unlimited()).unwrap();
            let c = cosine(alone[0].1.as_f32("e").unwrap(), &fixture.embeddings[i]);
            assert!(c >= 0.999, "{kind}: sentence {i} alone: cosine {c}");
        }
        // The long sentence was truncated to the model's 256 tokens.
        let counts = match out[1].1.data() {
            gpuwasm_tensor::Data::I64(c) => c.clone(),
            other => panic!("token counts are {other:?}"),
        };
        assert_eq!(counts[49], 256);
        assert_eq!(counts[37], 3, "`ok` is [CLS] ok [SEP]");
    }
}

#[test]
fn minilm_rejects_bad_inputs() {
    let graph = gpuwasm_tensor::load(Format::Safetensors, &minilm_files(), cpu()).unwrap();
    let f32_text = Tensor::from_bytes(vec![1], gpuwasm_tensor::DType::F32, &[0; 4]).unwrap();
    let cases = [
        (vec![("text".to_string(), f32_text)], "must be a U8 tensor"),
        (vec![("words".to_string(), Tensor::texts(&["a"]))], "unknown input \"words\""),
        (vec![], "takes one input"),
        (vec![("text".to_string(), Tensor::from_bytes(vec![1, 1, 1], gpuwasm_tensor::DType::U8, &[65]).unwrap())], "rank 1 or 2"),
        (vec![("text".to_string(), Tensor::from_bytes(vec![2], gpuwasm_tensor::DType::U8, &[0xff, 0xfe]).unwrap())], "not UTF-8"),
    ];
    for (inputs, want) in cases {
        let err = graph.run(inputs, &unlimited()).unwrap_err();
        assert!(matches!(err, gpuwasm_tensor::Error::InvalidInput(_)) && err.to_string().contains(want), "{err}");
    }
}

#[test]
fn minilm_files_are_checked() {
    let mut files = minilm_files();
    let weights = files.get_mut("model.safetensors").unwrap();
    *weights = weights[..weights.len() / 2].to_vec().into();
    let err = gpuwasm_tensor::check(Format::Safetensors, &files, &unlimited()).unwrap_err();
    assert!(matches!(err, gpuwasm_tensor::Error::InvalidModel(_)), "{err}");
    let mut files = minilm_files();
    files.remove("tokenizer.json");
    assert!(gpuwasm_tensor::check(Format::Safetensors, &files, &unlimited()).unwrap_err().to_string().contains("missing tokenizer.json"));

    // The check reads headers, not weights, and says what a load would.
    let files = minilm_files();
    let loaded = gpuwasm_tensor::load(Format::Safetensors, &files, cpu()).unwrap().signature();
    assert_eq!(gpuwasm_tensor::check(Format::Safetensors, &files, &unlimited()).unwrap(), loaded);
    assert_eq!(gpuwasm_tensor::check(Format::Safetensors, &minilm_half_files(), &unlimited()).unwrap(), loaded);
    // A tensor renamed in the header (same length: the offsets hold).
    let mut files = minilm_files();
    let weights = files.get_mut("model.safetensors").unwrap();
    let mut bytes = weights.to_vec();
    let name = b"encoder.layer.5.output.dense.bias";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("MiniLM has six layers");
    bytes[at + name.len() - 1] = b'_';
    *weights = bytes.into();
    let err = gpuwasm_tensor::check(Format::Safetensors, &files, &unlimited()).unwrap_err().to_string();
    assert!(err.contains("no tensor \"encoder.layer.5.output.dense.bias\""), "{err}");
}

#[test]
fn smollm2_gguf_parses_and_dequantises() {
    let bytes = std::fs::read(model_path("smollm2")).unwrap();
    let file = gguf::Gguf::parse(&bytes).expect("SmolLM2 GGUF parses");
    assert_eq!(file.architecture(), Some("llama"));
    assert_eq!(file.tensors.len(), 272);
    let summary = gpuwasm_tensor::check(Format::Gguf, &[("m.gguf".to_string(), bytes.clone().into())].into(), &unlimited()).unwrap();
    assert!(summary.contains("llama") && summary.contains("272 tensors"), "{summary}");
    // A Q4_1 weight dequantises to the right count of finite, varied values.
    let (name, info) = file.tensors.iter().find(|(_, t)| t.ty.0 == 3).expect("a Q4_1 tensor");
    let values = file.f32(name).unwrap();
    assert_eq!(values.len(), info.dims.iter().product::<usize>());
    assert!(values.iter().all(|v| v.is_finite()));
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / values.len() as f32;
    assert!(var > 1e-6 && var < 1.0, "variance {var}");
    // Cut in half, the file is refused.
    assert!(gguf::Gguf::parse(&bytes[..bytes.len() / 2]).is_err());
}

#[derive(serde::Deserialize)]
struct Digits {
    images: Vec<Vec<f32>>,
    labels: Vec<usize>,
    probabilities: Vec<Vec<f32>>,
}

#[test]
fn digits_onnx_matches_onnxruntime() {
    let reference: Digits = serde_json::from_str(include_str!("../../tests/fixtures/digits-reference.json")).unwrap();
    let n = reference.images.len();
    for backend in backends() {
        let kind = backend.info().kind.name();
        let file = include_bytes!("../../examples/classify/digits.onnx").to_vec();
        let model = gpuwasm_tensor::load(Format::Onnx, &[("digits.onnx".to_string(), file.into())].into(), backend).expect("the classifier loads");
        let pixels: Vec<f32> = reference.images.concat();
        let input = Tensor::new(vec![n, 1, 8, 8], gpuwasm_tensor::Data::F32(pixels)).unwrap();
        let out = model.run(vec![("pixels".into(), input)], &unlimited()).unwrap();
        assert_eq!(out[0].0, "probabilities");
        assert_eq!(out[0].1.shape(), &[n, 10]);
        let probs = out[0].1.as_f32("probabilities").unwrap();
        let mut worst = 0.0f32;
        let mut correct = 0;
        for (i, want) in reference.probabilities.iter().enumerate() {
            let row = &probs[i * 10..(i + 1) * 10];
            worst = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
            let class = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            let want_class = want.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(class, want_class, "{kind}: digit {i}");
            correct += (class == reference.labels[i]) as usize;
        }
        assert!(worst < 1e-5, "{kind}: largest difference from onnxruntime: {worst}");
        assert!(correct >= 56, "{kind}: only {correct} of {n} held-out digits right");
        eprintln!("{kind}: max |gpuwasm - onnxruntime| = {worst:e}; {correct}/{n} correct");
    }
}

#[test]
fn onnx_inputs_and_files_are_checked() {
    let bytes = include_bytes!("../../examples/classify/digits.onnx").to_vec();
    let model = gpuwasm_tensor::load(Format::Onnx, &[("d.onnx".to_string(), bytes.clone().into())].into(), cpu()).unwrap();
    let f32s = |shape: Vec<usize>| Tensor::new(shape.clone(), gpuwasm_tensor::Data::F32(vec![0.0; shape.iter().product()])).unwrap();
    for (inputs, want) in [
        (vec![("pixels".to_string(), f32s(vec![1, 1, 8, 9]))], "must have dimensions [?, 1, 8, 8], not [1, 1, 8, 9]"),
        (vec![("pixels".to_string(), f32s(vec![64]))], "must have dimensions"),
        (vec![("image".to_string(), f32s(vec![1, 1, 8, 8]))], "unknown input \"image\""),
        (vec![], "missing input \"pixels\""),
        (vec![("pixels".to_string(), Tensor::texts(&["x"]))], "must be FP32, not U8"),
    ] {
        let err = model.run(inputs, &unlimited()).unwrap_err();
        assert!(matches!(err, gpuwasm_tensor::Error::InvalidInput(_)) && err.to_string().contains(want), "{err}");
    }
    // Every prefix of the file is refused cleanly (no panic, no huge allocation).
    for cut in 0..bytes.len() {
        assert!(gpuwasm_tensor::check(Format::Onnx, &[("d.onnx".to_string(), bytes[..cut].to_vec().into())].into(), &unlimited()).is_err(), "cut at {cut}");
    }
    // Flipping bytes never panics.
    for i in (0..bytes.len()).step_by(13) {
        let mut broken = bytes.clone();
        broken[i] ^= 0x5a;
        let _ = gpuwasm_tensor::check(Format::Onnx, &[("d.onnx".to_string(), broken.into())].into(), &unlimited());
    }
}

#[test]
fn onnx_calls_batch_into_one_pass_with_the_same_results() {
    let reference: Digits = serde_json::from_str(include_str!("../../tests/fixtures/digits-reference.json")).unwrap();
    let model = gpuwasm_tensor::load(Format::Onnx, &[("d.onnx".to_string(), include_bytes!("../../examples/classify/digits.onnx").to_vec().into())].into(), cpu()).unwrap();
    let request = |i: usize, n: usize| {
        let pixels = reference.images[i..i + n].concat();
        vec![("pixels".to_string(), Tensor::new(vec![n, 1, 8, 8], gpuwasm_tensor::Data::F32(pixels)).unwrap())]
    };
    let batched = model.run_batch(vec![request(0, 1), request(1, 3), request(4, 2)], &unlimited());
    for (result, (i, n)) in batched.into_iter().zip([(0, 1), (1, 3), (4, 2)]) {
        let alone = model.run(request(i, n), &unlimited()).unwrap();
        let result = result.unwrap();
        assert_eq!(result[0].1.shape(), &[n, 10]);
        let (a, b) = (result[0].1.as_f32("").unwrap(), alone[0].1.as_f32("").unwrap());
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6));
    }
    // A bad request in a batch fails alone.
    let bad = vec![("pixels".to_string(), Tensor::new(vec![1, 1, 8, 7], gpuwasm_tensor::Data::F32(vec![0.0; 56])).unwrap())];
    let mixed = model.run_batch(vec![request(0, 1), bad], &unlimited());
    assert!(mixed[0].is_ok() && mixed[1].is_err());
}

#[test]
fn minilm_batches_larger_than_one_pass_agree_with_single_texts() {
    let bert = bert::Bert::load(&minilm_files(), cpu()).unwrap();
    let long = "A very long sentence follows. ".repeat(60);
    let mut texts: Vec<&str> = vec![long.as_str(); 40]; // 40 x 256 tokens: two passes
    texts.push("short one");
    let (vectors, counts) = bert.embed(&texts, &unlimited()).unwrap();
    assert_eq!(counts.iter().sum::<usize>(), 40 * 256 + 4);
    let (alone, _) = bert.embed(&["short one"], &unlimited()).unwrap();
    let last = &vectors[40 * 384..];
    assert!(last.iter().zip(&alone).all(|(a, b)| (a - b).abs() < 1e-5));
    let (first, _) = bert.embed(&[long.as_str()], &unlimited()).unwrap();
    assert!(vectors[..384].iter().zip(&first).all(|(a, b)| (a - b).abs() < 1e-5));
}

/// `v` as IEEE half precision, rounded to nearest (even on ties; the
/// encoder's weights are all normal halves or zero).
fn to_half(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign; // below half's normal range: MiniLM's weights hold none that matter
    }
    assert!(exp < 31, "{v} overflows a half");
    let mant = bits & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// MiniLM's safetensors file with every matrix converted to F16 (vectors
/// stay F32), as many published models ship.
fn minilm_half_files() -> ModelFiles {
    let mut files = minilm_files();
    let st = files.remove("model.safetensors").unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    let data = &st[8 + header_len..];
    let (mut out_header, mut out_data) = (serde_json::Map::new(), Vec::new());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let [start, end] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
        let bytes = &data[start..end];
        let matrix = info["shape"].as_array().unwrap().len() == 2 && info["dtype"] == "F32";
        let at = out_data.len();
        if matrix {
            out_data.extend(bytes.chunks_exact(4).flat_map(|c| to_half(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()));
        } else {
            out_data.extend_from_slice(bytes);
        }
        let dtype = if matrix { "F16".into() } else { info["dtype"].clone() };
        out_header.insert(name, serde_json::json!({"dtype": dtype, "shape": info["shape"], "data_offsets": [at, out_data.len()]}));
    }
    let header = serde_json::to_vec(&out_header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(out_data);
    files.insert("model.safetensors".into(), file.into());
    files
}

#[test]
fn minilm_in_half_precision_matches_too() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("../../tests/fixtures/minilm-embeddings.json")).expect("fixture parses");
    let texts: Vec<&str> = fixture.sentences.iter().take(12).map(String::as_str).collect();
    let files = minilm_half_files();
    let half_bytes = files["model.safetensors"].len();
    for backend in backends() {
        let kind = backend.info().kind.name();
        let graph = gpuwasm_tensor::load(Format::Safetensors, &files, backend).expect("MiniLM in f16 loads");
        // Matrices keep half precision on GPUs (half the bytes), the CPU widens them.
        let resident = graph.resident_bytes() as usize;
        match kind {
            "cpu" => assert!(resident > 3 * half_bytes / 2, "cpu: {resident} bytes resident for a {half_bytes}-byte file"),
            _ => assert!(resident < half_bytes, "{kind}: {resident} bytes resident for a {half_bytes}-byte file"),
        }
        let out = graph.run(vec![("text".into(), Tensor::texts(&texts))], &unlimited()).unwrap();
        let vectors = out[0].1.as_f32("embeddings").unwrap();
        let mut worst = 1.0f32;
        for (i, reference) in fixture.embeddings.iter().take(texts.len()).enumerate() {
            let c = cosine(&vectors[i * 384..(i + 1) * 384], reference);
            assert!(c >= 0.999, "{kind}: sentence {i}: cosine {c} in f16");
            worst = worst.min(c);
        }
        eprintln!("{kind}: MiniLM in f16: worst cosine over {} sentences: {worst:.6}, {resident} bytes resident", texts.len());
    }
}
