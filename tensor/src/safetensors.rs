//! The safetensors format: an 8-byte little-endian header length, a JSON
//! header naming each tensor's type, shape and byte range, then the bytes.
//! Every range is checked against the file before anything is read.

use crate::error::{Error, invalid_model};
use crate::backend::{HostData, HostWeight, WeightFormat};
use crate::quant;
use crate::tensor::element_count;
use std::collections::BTreeMap;

/// Headers larger than this are refused (real ones are a few hundred KiB).
const MAX_HEADER: u64 = 64 << 20;

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Element type as written (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    end: usize,
}

/// A parsed safetensors file borrowing its bytes.
#[derive(Debug)]
pub struct SafeTensors<'a> {
    entries: BTreeMap<String, Entry>,
    data: &'a [u8],
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

impl<'a> SafeTensors<'a> {
    /// Parses and checks the header of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<SafeTensors<'a>, Error> {
        let bad = |m: String| invalid_model(format!("safetensors: {m}"));
        let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("file shorter than its 8-byte header length".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER || header_len > (bytes.len() - 8) as u64 {
            return Err(bad(format!("header length {header_len} does not fit the {}-byte file", bytes.len())));
        }
        let header_end = 8 + header_len as usize;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..header_end]).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        let data = &bytes[header_end..];
        let mut entries = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                continue;
            }
            #[derive(serde::Deserialize)]
            struct Raw {
                dtype: String,
                shape: Vec<usize>,
                data_offsets: [usize; 2],
            }
            let raw: Raw = serde_json::from_value(value).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
            let size = dtype_size(&raw.dtype).ok_or_else(|| bad(format!("tensor {name:?}: unknown dtype {:?}", raw.dtype)))?;
            let [start, end] = raw.data_offsets;
            let want = element_count(&raw.shape).and_then(|n| n.checked_mul(size));
            if start > end || end > data.len() || want != Some(end - start) {
                return Err(bad(format!(
                    "tensor {name:?}: bytes {start}..{end} do not hold shape {:?} of {} inside the {}-byte data section",
                    raw.shape,
                    raw.dtype,
                    data.len()
                )));
            }
            entries.insert(name, Entry { dtype: raw.dtype, shape: raw.shape, start, end });
        }
        Ok(SafeTensors { entries, data })
    }

    /// The header entries, by name.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// Tensor `name` as floats, checking its shape is `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let (format, bytes) = self.float_tensor(name, shape)?;
        Ok(quant::decode(format, bytes))
    }

    /// Matrix `name` (`[rows, cols]`) as a weight in the file's format:
    /// half floats stay half floats (a backend widens them if it must).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<HostWeight, Error> {
        let (format, bytes) = self.float_tensor(name, &[rows, cols])?;
        Ok(match format {
            WeightFormat::F32 => HostWeight::f32(rows, cols, quant::decode(format, bytes)),
            _ => HostWeight { rows, cols, data: HostData::Encoded(format, bytes.to_vec()) },
        })
    }

    /// Checks tensor `name` is a float tensor of `shape`, without reading it.
    pub fn check_float(&self, name: &str, shape: &[usize]) -> Result<(), Error> {
        self.float_tensor(name, shape).map(drop)
    }

    fn float_tensor(&self, name: &str, shape: &[usize]) -> Result<(WeightFormat, &[u8]), Error> {
        let entry = self.entries.get(name).ok_or_else(|| invalid_model(format!("safetensors: no tensor {name:?}")))?;
        if entry.shape != shape {
            return Err(invalid_model(format!("safetensors: tensor {name:?} has shape {:?}, expected {shape:?}", entry.shape)));
        }
        let format = match entry.dtype.as_str() {
            "F32" => WeightFormat::F32,
            "F16" => WeightFormat::F16,
            "BF16" => WeightFormat::BF16,
            other => return Err(invalid_model(format!("safetensors: tensor {name:?} is {other}, expected a float type"))),
        };
        Ok((format, &self.data[entry.start..entry.end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_checked_tensors() {
        let bytes = file(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0, 0, 128, 63, 0, 0, 0, 64]);
        let st = SafeTensors::parse(&bytes).unwrap();
        assert_eq!(st.f32("w", &[2]).unwrap(), vec![1.0, 2.0]);
        assert!(st.f32("w", &[3]).is_err());
        assert!(st.f32("x", &[2]).is_err());
    }

    #[test]
    fn refuses_hostile_headers() {
        for (header, data) in [
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#, &[0u8; 8][..]),
            (r#"{"w":{"dtype":"F32","shape":[4000000000,4000000000],"data_offsets":[0,8]}}"#, &[0u8; 8][..]),
            (r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#, &[0u8; 8][..]),
            (r#"{"w":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#, &[0u8; 8][..]),
            (r#"not json"#, &[][..]),
        ] {
            assert!(matches!(SafeTensors::parse(&file(header, data)), Err(Error::InvalidModel(_))), "{header}");
        }
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(SafeTensors::parse(&huge).is_err());
        assert!(SafeTensors::parse(&[1, 2]).is_err());
    }
}
