//! GGUF, llama.cpp's model file: metadata, a tensor directory and aligned
//! tensor data. Every count, length and offset is checked against the
//! bytes actually present before it is used, so a hostile file cannot make
//! the parser allocate more than the file's own size.

use crate::error::{Error, invalid_model};
use crate::backend::WeightFormat;
use crate::quant;
use crate::tensor::element_count;
use std::collections::BTreeMap;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    UInt(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array, kept where it lies in the file (see [`Gguf::array`]).
    Array(Array),
}

/// An array value as the bytes it occupies in the file: parsing one costs
/// no memory whatever its length (a vocabulary of 150k strings included),
/// and reading it decodes items one at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// The GGUF value type of the items.
    pub item_type: u32,
    /// Number of items.
    pub len: usize,
    /// Where the items lie in the file.
    range: std::ops::Range<usize>,
}

/// Metadata entries a file may hold (real files hold a few dozen).
const MAX_METADATA: usize = 1 << 16;
/// Tensors a file may hold (the largest published models hold a few thousand).
const MAX_TENSORS: usize = 1 << 16;

/// Tensor element encodings this engine knows the size of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

/// Every encoding this engine knows: id, llama.cpp name, elements per
/// block, bytes per block.
const TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (30, "BF16", 1, 2),
];

impl GgmlType {
    fn known(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        TYPES.iter().find(|t| t.0 == self.0)
    }

    /// (elements per block, bytes per block), or `None` for unknown types.
    fn block(self) -> Option<(usize, usize)> {
        self.known().map(|&(_, _, elements, bytes)| (elements, bytes))
    }

    /// The weight format of this encoding, when the engine computes with it.
    pub fn format(self) -> Option<WeightFormat> {
        Some(match self.0 {
            0 => WeightFormat::F32,
            1 => WeightFormat::F16,
            30 => WeightFormat::BF16,
            2 => WeightFormat::Q4_0,
            3 => WeightFormat::Q4_1,
            8 => WeightFormat::Q8_0,
            12 => WeightFormat::Q4K,
            13 => WeightFormat::Q5K,
            14 => WeightFormat::Q6K,
            _ => return None,
        })
    }

    /// Its llama.cpp name.
    pub fn name(self) -> String {
        self.known().map_or(format!("type {}", self.0), |t| t.1.to_string())
    }
}

/// One tensor in the directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions, innermost first (GGUF order).
    pub dims: Vec<usize>,
    /// Encoding.
    pub ty: GgmlType,
    /// Byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// A parsed GGUF file borrowing its bytes.
#[derive(Debug)]
pub struct Gguf<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    bytes: &'a [u8],
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            invalid_model(format!("gguf: truncated: {n} bytes needed at offset {}, file has {}", self.at, self.bytes.len()))
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count of items each at least `min_size` bytes long: never more than could fit.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, Error> {
        let n = self.u64()?;
        let room = (self.bytes.len() - self.at) / min_size.max(1);
        if n > room as u64 {
            return Err(invalid_model(format!("gguf: {what} count {n} cannot fit in the rest of the file")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, Error> {
        let n = self.count(1, "string length")?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| invalid_model("gguf: a string is not UTF-8"))
    }
    fn value(&mut self, ty: u32) -> Result<Value, Error> {
        Ok(match ty {
            8 => Value::Str(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let len = self.count(1, "array")?;
                let start = self.at;
                self.skip_items(item_type, len, 1)?;
                Value::Array(Array { item_type, len, range: start..self.at })
            }
            scalar => self.scalar(scalar)?,
        })
    }
    /// A value that is neither a string nor an array.
    fn scalar(&mut self, ty: u32) -> Result<Value, Error> {
        Ok(match ty {
            0 => Value::UInt(self.take(1)?[0] as u64),
            1 => Value::Int(self.take(1)?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::UInt(self.u32()? as u64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_bits(self.u64()?)),
            other => return Err(invalid_model(format!("gguf: unknown value type {other}"))),
        })
    }
    /// Checks `len` items of `item_type` and moves past them, allocating
    /// nothing: strings are checked for UTF-8 in place.
    fn skip_items(&mut self, item_type: u32, len: usize, depth: u32) -> Result<(), Error> {
        for _ in 0..len {
            match item_type {
                8 => {
                    let n = self.count(1, "string length")?;
                    std::str::from_utf8(self.take(n)?).map_err(|_| invalid_model("gguf: a string is not UTF-8"))?;
                }
                9 if depth < 2 => {
                    let inner = self.u32()?;
                    let n = self.count(1, "array")?;
                    self.skip_items(inner, n, depth + 1)?;
                }
                9 => return Err(invalid_model("gguf: arrays nested more than two deep")),
                scalar => {
                    self.scalar(scalar)?;
                }
            }
        }
        Ok(())
    }
    /// A string the parse already checked, borrowed from the file.
    fn checked_str(&mut self) -> &'a str {
        let n = self.u64().expect("checked at parse") as usize;
        std::str::from_utf8(self.take(n).expect("checked at parse")).expect("checked at parse")
    }
}

impl<'a> Gguf<'a> {
    /// Parses and checks a GGUF file.
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>, Error> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(invalid_model("not a GGUF file (no GGUF magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Unsupported(format!("GGUF version {version} (2 and 3 are supported)")));
        }
        // A tensor entry takes at least 4+8+4+8+4 bytes, a key-value pair 8+4+1.
        let tensor_count = r.u64()?;
        let kv_count = r.count(13, "metadata")?;
        if kv_count > MAX_METADATA {
            return Err(invalid_model(format!("gguf: {kv_count} metadata entries; at most {MAX_METADATA} are accepted")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            metadata.insert(key, r.value(ty)?);
        }
        if tensor_count > ((bytes.len() - r.at) / 28) as u64 {
            return Err(invalid_model(format!("gguf: tensor count {tensor_count} cannot fit in the rest of the file")));
        }
        if tensor_count > MAX_TENSORS as u64 {
            return Err(invalid_model(format!("gguf: {tensor_count} tensors; at most {MAX_TENSORS} are accepted")));
        }
        let mut raw = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(invalid_model(format!("gguf: tensor {name:?} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64().map(|d| usize::try_from(d).unwrap_or(usize::MAX)))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = GgmlType(r.u32()?);
            let offset = r.u64()?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(Value::UInt(a)) if a.is_power_of_two() && *a <= 1 << 16 => *a as usize,
            Some(other) => return Err(invalid_model(format!("gguf: bad general.alignment {other:?}"))),
        };
        let data_start = r.at.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in raw {
            let (per_block, block_bytes) =
                ty.block().ok_or_else(|| Error::Unsupported(format!("gguf: tensor {name:?} has unknown type {}", ty.0)))?;
            let count = element_count(&dims);
            let size = count.filter(|n| n % per_block == 0).and_then(|n| (n / per_block).checked_mul(block_bytes));
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            let range = match (size, start) {
                (Some(size), Some(start)) if start.checked_add(size).is_some_and(|end| end <= bytes.len()) => start..start + size,
                _ => {
                    return Err(invalid_model(format!(
                        "gguf: tensor {name:?} ({dims:?} of {}) at offset {offset} does not fit in the {}-byte file",
                        ty.name(),
                        bytes.len()
                    )));
                }
            };
            if tensors.insert(name.clone(), TensorInfo { dims, ty, range }).is_some() {
                return Err(invalid_model(format!("gguf: tensor {name:?} appears twice")));
            }
        }
        Ok(Gguf { version, metadata, tensors, bytes })
    }

    /// `general.architecture` (`llama`, ...).
    pub fn architecture(&self) -> Option<&str> {
        match self.metadata.get("general.architecture") {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The array under `key`, if the metadata holds one.
    pub fn array(&self, key: &str) -> Option<&Array> {
        match self.metadata.get(key) {
            Some(Value::Array(a)) => Some(a),
            _ => None,
        }
    }

    /// The items of a string array, borrowed from the file; `None` when
    /// its items are not strings.
    pub fn strings(&self, array: &Array) -> Option<impl Iterator<Item = &'a str> + use<'a>> {
        (array.item_type == 8).then(|| {
            let mut r = Reader { bytes: &self.bytes[..array.range.end], at: array.range.start };
            (0..array.len).map(move |_| r.checked_str())
        })
    }

    /// The items of an array of numbers or booleans; `None` for arrays of
    /// strings or arrays.
    pub fn values(&self, array: &Array) -> Option<impl Iterator<Item = Value> + use<'a>> {
        let item_type = array.item_type;
        (item_type != 8 && item_type != 9).then(|| {
            let mut r = Reader { bytes: &self.bytes[..array.range.end], at: array.range.start };
            (0..array.len).map(move |_| r.scalar(item_type).expect("checked at parse"))
        })
    }

    /// A one-line description.
    pub fn describe(&self) -> String {
        let params: usize = self.tensors.values().filter_map(|t| element_count(&t.dims)).sum();
        format!(
            "GGUF v{}, {} architecture, {} tensors, {:.1}M parameters",
            self.version,
            self.architecture().unwrap_or("unknown"),
            self.tensors.len(),
            params as f64 / 1e6
        )
    }

    /// Tensor `name` decoded to floats (every format of
    /// [`GgmlType::format`]).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, Error> {
        let info = self.tensors.get(name).ok_or_else(|| invalid_model(format!("gguf: no tensor {name:?}")))?;
        let format = info.ty.format().ok_or_else(|| Error::Unsupported(format!("gguf: decoding {} (tensor {name:?})", info.ty.name())))?;
        Ok(quant::decode(format, &self.bytes[info.range.clone()]))
    }

    /// Tensor `name`'s bytes as the file encodes them.
    pub fn raw(&self, name: &str) -> Option<&'a [u8]> {
        self.tensors.get(name).map(|info| &self.bytes[info.range.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file with one string metadata entry and one F32 tensor.
    pub(crate) fn tiny(dims: &[u64], offset: u64, data: &[f32]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        let key = "general.architecture";
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(5u64.to_le_bytes());
        b.extend(b"llama");
        b.extend(1u64.to_le_bytes());
        b.extend(b"w");
        b.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(0u32.to_le_bytes());
        b.extend(offset.to_le_bytes());
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        data.iter().for_each(|x| b.extend(x.to_le_bytes()));
        b
    }

    #[test]
    fn parses_and_reads() {
        let file = tiny(&[2, 2], 0, &[1.0, 2.0, 3.0, 4.0]);
        let g = Gguf::parse(&file).unwrap();
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.f32("w").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn refuses_hostile_files() {
        let cases = [
            tiny(&[2, 2], 64, &[1.0; 4]),                      // offset past the end
            tiny(&[u64::MAX, u64::MAX], 0, &[1.0; 4]),         // dimensions overflow
            tiny(&[1 << 40], 0, &[1.0; 4]),                    // far bigger than the file
            tiny(&[2, 2], 0, &[1.0; 4])[..60].to_vec(),        // truncated
        ];
        for file in &cases {
            assert!(matches!(Gguf::parse(file), Err(Error::InvalidModel(_))), "{:?}", Gguf::parse(file).err());
        }
        // Claims 2^60 metadata entries: refused before any allocation.
        let mut huge = b"GGUF".to_vec();
        huge.extend(3u32.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        huge.extend((1u64 << 60).to_le_bytes());
        assert!(Gguf::parse(&huge).is_err());
        assert!(Gguf::parse(b"GGML....").is_err());
    }

    /// A GGUF v3 file with no tensors and the metadata entries `kvs`
    /// (key, type, encoded value).
    fn with_metadata(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (key, ty, value) in kvs {
            b.extend((key.len() as u64).to_le_bytes());
            b.extend(key.as_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(value);
        }
        b
    }

    fn array(item_type: u32, len: u64, items: &[u8]) -> Vec<u8> {
        let mut v = item_type.to_le_bytes().to_vec();
        v.extend(len.to_le_bytes());
        v.extend(items);
        v
    }

    fn strings(items: &[&[u8]]) -> Vec<u8> {
        items.iter().flat_map(|s| (s.len() as u64).to_le_bytes().into_iter().chain(s.iter().copied())).collect()
    }

    #[test]
    fn arrays_stay_in_the_file_and_decode_on_demand() {
        // The amplification attack: one array of 4M u8 values. Parsed, it
        // is an offset and a length, not 4M enum values.
        let n = 4 << 20;
        let file = with_metadata(&[
            ("big", 9, array(0, n, &vec![7u8; n as usize])),
            ("tokens", 9, array(8, 2, &strings(&[b"a", "\u{e9}t\u{e9}".as_bytes()]))),
            ("scores", 9, array(6, 2, &[0, 0, 128, 63, 0, 0, 0, 64])),
        ]);
        let g = Gguf::parse(&file).unwrap();
        let big = g.array("big").unwrap();
        assert_eq!((big.item_type, big.len, big.range.len()), (0, n as usize, n as usize));
        assert_eq!(g.values(big).unwrap().nth(12345), Some(Value::UInt(7)));
        assert_eq!(g.strings(g.array("tokens").unwrap()).unwrap().collect::<Vec<_>>(), ["a", "\u{e9}t\u{e9}"]);
        assert_eq!(g.values(g.array("scores").unwrap()).unwrap().collect::<Vec<_>>(), [Value::Float(1.0), Value::Float(2.0)]);
        assert!(g.strings(big).is_none() && g.values(g.array("tokens").unwrap()).is_none());

        // Items are still checked at parse: bad UTF-8, a truncated array,
        // arrays nested three deep.
        let bad_utf8 = with_metadata(&[("t", 9, array(8, 1, &strings(&[&[0xff, 0xfe]])))]);
        assert!(Gguf::parse(&bad_utf8).unwrap_err().to_string().contains("not UTF-8"));
        let truncated = with_metadata(&[("t", 9, array(4, 10, &[0; 12]))]);
        assert!(Gguf::parse(&truncated).unwrap_err().to_string().contains("truncated"));
        let deep = with_metadata(&[("t", 9, array(9, 1, &array(9, 1, &array(0, 1, &[1]))))]);
        assert!(Gguf::parse(&deep).unwrap_err().to_string().contains("nested"));
        let two_deep = with_metadata(&[("t", 9, array(9, 1, &array(0, 1, &[1])))]);
        assert!(Gguf::parse(&two_deep).is_ok());
    }

    #[test]
    fn entry_counts_are_capped() {
        let kvs: Vec<(String, u32, Vec<u8>)> = (0..=MAX_METADATA).map(|i| (format!("k{i}"), 0, vec![1])).collect();
        let kvs: Vec<(&str, u32, Vec<u8>)> = kvs.iter().map(|(k, t, v)| (k.as_str(), *t, v.clone())).collect();
        let err = Gguf::parse(&with_metadata(&kvs)).unwrap_err();
        assert!(err.to_string().contains("at most 65536"), "{err}");
    }
}
