//! Tensors: a shape and row-major data.

use crate::error::{Error, invalid_input};
use crate::quant::{bf16_to_f32, f16_to_f32};

/// Element types as wasi-nn names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// bfloat16.
    BF16,
    /// Unsigned bytes (also UTF-8 text).
    U8,
    /// 32-bit signed integers.
    I32,
    /// 64-bit signed integers.
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// The elements of a tensor. Half and double precision arrive as `F32`,
/// 32-bit integers as `I64`.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// Floating point.
    F32(Vec<f32>),
    /// Integers (indices, shapes, token ids).
    I64(Vec<i64>),
    /// Bytes (text).
    U8(Vec<u8>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::U8(v) => v.len(),
        }
    }

    /// Bytes one element takes in memory.
    pub fn width(&self) -> usize {
        match self {
            Data::F32(_) => 4,
            Data::I64(_) => 8,
            Data::U8(_) => 1,
        }
    }

    /// The type's name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Data::F32(_) => "FP32",
            Data::I64(_) => "I64",
            Data::U8(_) => "U8",
        }
    }
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

/// The number of elements of `shape`, or `None` on overflow.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl Tensor {
    /// A tensor, checking that `data` has exactly as many elements as `shape` needs.
    pub fn new(shape: Vec<usize>, data: Data) -> Result<Tensor, Error> {
        match element_count(&shape) {
            Some(n) if n == data.len() => Ok(Tensor { shape, data }),
            _ => Err(invalid_input(format!(
                "dimensions {shape:?} need {} elements, the data has {}",
                element_count(&shape).map_or("too many".to_string(), |n| n.to_string()),
                data.len()
            ))),
        }
    }

    /// A float tensor; panics when the sizes disagree (for engine-made tensors).
    pub(crate) fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor::new(shape, Data::F32(data)).expect("engine-made tensor has a consistent shape")
    }

    /// Texts as an encoder's `text` input: `U8 [n, width]`, one UTF-8
    /// text per row padded with zero bytes.
    pub fn texts(texts: &[&str]) -> Tensor {
        let width = texts.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
        let mut bytes = vec![0u8; texts.len() * width];
        for (row, text) in bytes.chunks_exact_mut(width).zip(texts) {
            row[..text.len()].copy_from_slice(text.as_bytes());
        }
        Tensor { shape: vec![texts.len(), width], data: Data::U8(bytes) }
    }

    /// Its dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Its elements.
    pub fn data(&self) -> &Data {
        &self.data
    }

    /// Bytes its elements take in memory.
    pub fn memory_bytes(&self) -> u64 {
        (self.data.len() * self.data.width()) as u64
    }

    /// Its elements, taken.
    pub fn into_data(self) -> Data {
        self.data
    }

    /// The elements as floats, or an error naming `what`.
    pub fn as_f32(&self, what: &str) -> Result<&[f32], Error> {
        match &self.data {
            Data::F32(v) => Ok(v),
            other => Err(invalid_input(format!("{what} must be FP32, not {}", other.type_name()))),
        }
    }

    /// Decodes little-endian wasi-nn tensor bytes.
    pub fn from_bytes(shape: Vec<usize>, ty: DType, bytes: &[u8]) -> Result<Tensor, Error> {
        let count = element_count(&shape).ok_or_else(|| invalid_input(format!("dimensions {shape:?} overflow")))?;
        let expected = count.checked_mul(ty.size());
        if expected != Some(bytes.len()) {
            return Err(invalid_input(format!(
                "dimensions {shape:?} of {ty:?} need {} bytes, the data has {}",
                expected.map_or("too many".to_string(), |n| n.to_string()),
                bytes.len()
            )));
        }
        let chunks = |n: usize| bytes.chunks_exact(n);
        let data = match ty {
            DType::U8 => Data::U8(bytes.to_vec()),
            DType::F32 => Data::F32(chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            DType::F64 => Data::F32(chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()),
            DType::F16 => Data::F32(chunks(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()),
            DType::BF16 => Data::F32(chunks(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()),
            DType::I32 => Data::I64(chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()),
            DType::I64 => Data::I64(chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
        };
        Ok(Tensor { shape, data })
    }

    /// Encodes as little-endian wasi-nn tensor bytes.
    pub fn to_bytes(&self) -> (DType, Vec<u8>) {
        match &self.data {
            Data::F32(v) => (DType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::I64(v) => (DType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::U8(v) => (DType::U8, v.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_size_checks() {
        let t = Tensor::from_bytes(vec![2], DType::F32, &[0, 0, 128, 63, 0, 0, 0, 64]).unwrap();
        assert_eq!(t.data(), &Data::F32(vec![1.0, 2.0]));
        assert_eq!(t.to_bytes().1, vec![0, 0, 128, 63, 0, 0, 0, 64]);
        let err = Tensor::from_bytes(vec![3], DType::F32, &[0; 8]).unwrap_err();
        assert!(err.to_string().contains("need 12 bytes, the data has 8"), "{err}");
        assert!(Tensor::from_bytes(vec![usize::MAX, 2], DType::U8, &[]).is_err());
    }
}
