//! Hostile model files made by the tests themselves, a few lines each: ONNX
//! (protobuf written by hand) and GGUF.

#![allow(dead_code)] // each test binary uses a different subset

/// A protobuf message under construction.
#[derive(Default)]
pub struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut n: u64) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    pub fn int(mut self, field: u32, value: i64) -> Self {
        self.varint(u64::from(field) << 3);
        self.varint(value as u64);
        self
    }

    pub fn bytes(mut self, field: u32, value: &[u8]) -> Self {
        self.varint((u64::from(field) << 3) | 2);
        self.varint(value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    pub fn str(self, field: u32, value: &str) -> Self {
        self.bytes(field, value.as_bytes())
    }

    pub fn msg(self, field: u32, value: Message) -> Self {
        self.bytes(field, &value.0)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// A dimension of a declared input: fixed, or symbolic (`None`).
pub type Dim = Option<i64>;

/// An FP32 initializer of `dims` holding zeros.
pub fn zeros(name: &str, dims: &[i64]) -> Message {
    filled(name, dims, 0.0)
}

/// An FP32 initializer of `dims` holding `value` in every element.
pub fn filled(name: &str, dims: &[i64], value: f32) -> Message {
    let count: i64 = dims.iter().product();
    let mut t = Message::default();
    for &d in dims {
        t = t.int(1, d);
    }
    t.int(2, 1).str(8, name).bytes(9, &value.to_le_bytes().repeat(count as usize))
}

/// An FP32 graph input; `dims: None` declares no shape at all.
fn input(name: &str, dims: Option<&[Dim]>) -> Message {
    let mut tensor_type = Message::default().int(1, 1);
    if let Some(dims) = dims {
        let mut shape = Message::default();
        for d in dims {
            let dim = match d {
                Some(v) => Message::default().int(1, *v),
                None => Message::default().str(2, "n"),
            };
            shape = shape.msg(1, dim);
        }
        tensor_type = tensor_type.msg(2, shape);
    }
    Message::default().str(1, name).msg(2, Message::default().msg(1, tensor_type))
}

/// An ONNX model (opset 13): input `text` of `dims`, `initializers`, and
/// `nodes` (op, inputs, output); the last node's output is the graph's `out`.
pub fn onnx(text_dims: Option<&[Dim]>, initializers: Vec<Message>, nodes: &[(&str, &[&str], &str)]) -> Vec<u8> {
    let mut graph = Message::default().str(2, "hostile").msg(11, input("text", text_dims));
    for node in nodes {
        let (op, inputs, output) = node;
        let mut n = Message::default();
        for i in *inputs {
            n = n.str(1, i);
        }
        graph = graph.msg(1, n.str(2, output).str(4, op));
    }
    for init in initializers {
        graph = graph.msg(5, init);
    }
    graph = graph.msg(12, Message::default().str(1, "out"));
    Message::default().int(1, 8).msg(8, Message::default().str(1, "").int(2, 13)).msg(7, graph).into_bytes()
}

/// The model from the security review: any-shape input -> Add(text,
/// A[100000,1]) -> Add(_, B[100000,1,1]): 800 KB that asks for 40 GB.
pub fn broadcast_bomb() -> Vec<u8> {
    onnx(
        None,
        vec![zeros("A", &[100_000, 1]), zeros("B", &[100_000, 1, 1])],
        &[("Add", &["text", "A"], "h"), ("Add", &["h", "B"], "out")],
    )
}

/// Harmless at its smallest (`text` of one element gives 400 KB), 40 GB
/// when a caller sends 100000 elements.
pub fn input_sized_bomb() -> Vec<u8> {
    onnx(Some(&[None]), vec![zeros("A", &[100_000, 1])], &[("Add", &["text", "A"], "out")])
}

/// A harmless model: `out` = `text` (FP32 `[4]`) + 4 elements of `value`.
pub fn adds(value: f32) -> Vec<u8> {
    onnx(Some(&[Some(4)]), vec![filled("A", &[4], value)], &[("Add", &["text", "A"], "out")])
}

/// A GGUF v3 file with no tensors and one metadata array of `n` u8 values:
/// the file is `n` bytes and a few more.
pub fn gguf_with_u8_array(n: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    let key = "junk";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(9u32.to_le_bytes()); // array
    b.extend(0u32.to_le_bytes()); // of u8
    b.extend(n.to_le_bytes());
    b.resize(b.len() + n as usize, 1);
    b
}

/// A tiny llama-architecture GGUF (width 64, 4 heads, one block,
/// feed-forward 128, 4 tokens, f32 zeros) that declares a vocabulary of
/// `vocab_size` and gives `blk.0.attn_q.weight` `q_rows` rows (64 is
/// right): the sizes a hostile file lies about.
pub fn gguf_decoder(vocab_size: u64, q_rows: u64) -> Vec<u8> {
    fn string(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }
    let (dim, ffn) = (64u64, 128u64);
    let tensors: Vec<(&str, Vec<u64>)> = vec![
        ("token_embd.weight", vec![dim, 4]),
        ("output_norm.weight", vec![dim]),
        ("blk.0.attn_norm.weight", vec![dim]),
        ("blk.0.attn_q.weight", vec![dim, q_rows]),
        ("blk.0.attn_k.weight", vec![dim, dim]),
        ("blk.0.attn_v.weight", vec![dim, dim]),
        ("blk.0.attn_output.weight", vec![dim, dim]),
        ("blk.0.ffn_norm.weight", vec![dim]),
        ("blk.0.ffn_gate.weight", vec![dim, ffn]),
        ("blk.0.ffn_up.weight", vec![dim, ffn]),
        ("blk.0.ffn_down.weight", vec![ffn, dim]),
    ];
    let uints = [
        ("llama.block_count", 1),
        ("llama.embedding_length", dim),
        ("llama.attention.head_count", 4),
        ("llama.feed_forward_length", ffn),
        ("llama.vocab_size", vocab_size),
    ];
    let tokens = ["a", "b", "c", "d"];
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((uints.len() as u64 + 3).to_le_bytes());
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    string(&mut b, "tokenizer.ggml.model");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "gpt2");
    string(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend((tokens.len() as u64).to_le_bytes());
    tokens.iter().for_each(|t| string(&mut b, t));
    for (key, value) in uints {
        string(&mut b, key);
        b.extend(10u32.to_le_bytes()); // u64
        b.extend(value.to_le_bytes());
    }
    let mut offset = 0u64;
    for (name, dims) in &tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(0u32.to_le_bytes()); // f32
        b.extend(offset.to_le_bytes());
        offset += (dims.iter().product::<u64>() * 4).next_multiple_of(32);
    }
    b.resize(b.len().next_multiple_of(32) + offset as usize, 0);
    b
}
