//! A protobuf wire-format reader for the parts of ONNX's `ModelProto`
//! the interpreter uses. Every length is checked against the bytes left,
//! so a hostile file cannot make it read out of bounds or allocate more
//! than the file holds.

use crate::error::{Error, invalid_model};

/// One field of a message: its number and value.
pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterates over the fields of one message.
pub(crate) struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or_else(|| invalid_model("onnx: truncated varint"))?;
            self.at += 1;
            value |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(invalid_model("onnx: varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| invalid_model(format!("onnx: a field of {n} bytes runs past the end of its message")))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    /// The next field, or `None` at the end of the message.
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, Error> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| invalid_model("onnx: field number out of range"))?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| invalid_model("onnx: length out of range"))?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            other => return Err(invalid_model(format!("onnx: unsupported wire type {other}"))),
        };
        Ok(Some((field, value)))
    }
}

impl<'a> Value<'a> {
    pub fn bytes(&self) -> Result<&'a [u8], Error> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(invalid_model("onnx: expected a length-delimited field")),
        }
    }

    pub fn string(&self) -> Result<String, Error> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| invalid_model("onnx: a string is not UTF-8"))
    }

    pub fn int(&self) -> Result<i64, Error> {
        match self {
            Value::Varint(v) => Ok(*v as i64),
            _ => Err(invalid_model("onnx: expected an integer field")),
        }
    }

    /// Repeated int64s, packed or one per field.
    pub fn push_ints(&self, out: &mut Vec<i64>) -> Result<(), Error> {
        match self {
            Value::Varint(v) => out.push(*v as i64),
            Value::Bytes(b) => {
                let mut f = Fields::new(b);
                while f.at < b.len() {
                    out.push(f.varint()? as i64);
                }
            }
            _ => return Err(invalid_model("onnx: expected integers")),
        }
        Ok(())
    }

    /// Repeated floats, packed or one per field.
    pub fn push_floats(&self, out: &mut Vec<f32>) -> Result<(), Error> {
        match self {
            Value::Fixed32(v) => out.push(f32::from_bits(*v)),
            Value::Bytes(b) if b.len() % 4 == 0 => {
                out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())))
            }
            _ => return Err(invalid_model("onnx: expected floats")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_refuses_overruns() {
        // field 1 varint 150; field 2 bytes "hi"; field 3 fixed32 1.0
        let msg = [0x08, 0x96, 0x01, 0x12, 0x02, b'h', b'i', 0x1d, 0, 0, 0x80, 0x3f];
        let mut f = Fields::new(&msg);
        let (n, v) = f.next_field().unwrap().unwrap();
        assert_eq!((n, v.int().unwrap()), (1, 150));
        let (n, v) = f.next_field().unwrap().unwrap();
        assert_eq!((n, v.string().unwrap().as_str()), (2, "hi"));
        let (n, v) = f.next_field().unwrap().unwrap();
        let mut floats = Vec::new();
        v.push_floats(&mut floats).unwrap();
        assert_eq!((n, floats), (3, vec![1.0]));
        assert!(f.next_field().unwrap().is_none());
        // A length of 2^60 in a 4-byte message.
        let hostile = [0x12, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
        assert!(Fields::new(&hostile).next_field().is_err());
        assert!(Fields::new(&[0x08]).next_field().is_err());
    }
}
