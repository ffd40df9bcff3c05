//! A minimal GGUF v3 writer: the tests build model files with it (bitexact's blocks for the
//! Python `gguf` reader to check), and so does the fuzz corpus.

use super::{Array, GgmlType, Value};

/// A GGUF file under construction.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Data)>,
}

/// A tensor's stored bytes, or only their length when they are streamed at write time
/// ([`GgufWriter::write_streaming`]).
enum Data {
    Bytes(Vec<u8>),
    Deferred(u64),
}

impl Data {
    fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Deferred(n) => *n,
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.element_type().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => out.extend(v.iter().map(|&x| u8::from(x))),
        Array::String(v) => v.iter().for_each(|x| put_string(out, x)),
        Array::Array(v) => v.iter().for_each(|x| put_array(out, x)),
        Array::U64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key.
    pub fn meta(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Adds a tensor: `dims` innermost first, `data` its stored bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, Data::Bytes(data)));
        self
    }

    /// Adds a tensor whose `len` bytes [`GgufWriter::write_streaming`] asks for when it writes
    /// them (a 30B model never sits in memory whole).
    pub fn tensor_deferred(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        len: u64,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, Data::Deferred(len)));
        self
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", Value::U32(a)) if *a > 0 => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(32)
    }

    /// Header, metadata and tensor infos, padded to the alignment: everything before the data.
    fn head(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + data.len()).next_multiple_of(align);
        }
        out.resize((out.len() as u64).next_multiple_of(align) as usize, 0);
        out
    }

    /// Writes the file to `w`, asking `fill(i)` for the bytes of each deferred tensor `i` (in
    /// order, once each). A length other than the one declared is an error. Returns the bytes
    /// written.
    pub fn write_streaming(
        &self,
        w: &mut impl std::io::Write,
        mut fill: impl FnMut(usize) -> std::io::Result<Vec<u8>>,
    ) -> std::io::Result<u64> {
        let align = self.alignment();
        let head = self.head();
        w.write_all(&head)?;
        let mut at = head.len() as u64;
        for (i, (name, _, _, data)) in self.tensors.iter().enumerate() {
            let fresh;
            let bytes: &[u8] = match data {
                Data::Bytes(b) => b,
                Data::Deferred(n) => {
                    fresh = fill(i)?;
                    if fresh.len() as u64 != *n {
                        return Err(std::io::Error::other(format!(
                            "tensor {name}: {} bytes given, {n} declared",
                            fresh.len()
                        )));
                    }
                    &fresh
                }
            };
            w.write_all(bytes)?;
            at += bytes.len() as u64;
            let pad = at.next_multiple_of(align) - at;
            w.write_all(&vec![0u8; pad as usize])?;
            at += pad;
        }
        Ok(at)
    }

    /// The file's bytes, aligned to `general.alignment` (32 when absent). Deferred tensors
    /// are written as zeros (use [`GgufWriter::write_streaming`] for them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_streaming(&mut out, |i| Ok(vec![0; self.tensors[i].3.len() as usize]))
            .expect("writing to memory");
        out
    }
}
