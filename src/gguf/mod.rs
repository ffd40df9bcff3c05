//! A GGUF (v2 and v3) reader, hardened against malformed and hostile files.
//!
//! [`GgufFile::open`] reads the header, metadata and tensor infos of a file and leaves the
//! tensor data on disk; [`GgufFile::parse`] reads any byte slice. Every count, length, offset
//! and dimension is checked against the bytes that remain before it is used, so a malformed
//! file gives a [`GgufError`], never a panic, an out-of-bounds read or an allocation larger
//! than the file. [`GgufFile::tensor_data`] reads a tensor's checked byte range with a
//! positioned read, not through a memory map: a file that shrinks (or is replaced) after it was
//! opened gives an error naming the tensor, where a mapping would kill the process with SIGBUS.
//!
//! Layout (little-endian): magic `GGUF`, version `u32`, tensor count `u64`, metadata count
//! `u64`; the metadata key/value pairs; the tensor infos (name, dims, ggml type, offset); padding
//! to `general.alignment` (default 32); the tensor data, each tensor at its offset from the start
//! of the data section, aligned.

/// A minimal GGUF v3 writer.
pub mod writer;

use std::collections::HashSet;
use std::path::Path;

use crate::quant::WeightFormat;

pub use crate::error::GgufError;

/// Result alias of this module.
pub type GgufResult<T> = std::result::Result<T, GgufError>;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `f32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values of one type.
    Array(Array),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f64`
    F64(f64),
}

/// A metadata array, stored by element type so that it takes no more memory than its bytes in
/// the file (a `u8` array is a `Vec<u8>`).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// Strings.
    String(Vec<String>),
    /// Arrays.
    Array(Vec<Array>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f64` elements.
    F64(Vec<f64>),
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF value type of the elements.
    pub fn element_type(&self) -> u32 {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::String(_) => 8,
            Array::Array(_) => 9,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }

    fn preview(&self) -> Vec<String> {
        fn take<T: std::fmt::Debug>(v: &[T]) -> Vec<String> {
            v.iter().take(3).map(|x| format!("{x:?}")).collect()
        }
        match self {
            Array::U8(v) => take(v),
            Array::I8(v) => take(v),
            Array::U16(v) => take(v),
            Array::I16(v) => take(v),
            Array::U32(v) => take(v),
            Array::I32(v) => take(v),
            Array::F32(v) => take(v),
            Array::Bool(v) => take(v),
            Array::String(v) => take(v),
            Array::Array(v) => v
                .iter()
                .take(3)
                .map(|a| format!("[{} elements]", a.len()))
                .collect(),
            Array::U64(v) => take(v),
            Array::I64(v) => take(v),
            Array::F64(v) => take(v),
        }
    }
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// A short rendering for listings (long arrays abbreviated).
    pub fn display(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                format!("{:?}..", s.chars().take(60).collect::<String>())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) if a.len() > 3 => {
                format!("[{}, .. ({} elements)]", a.preview().join(", "), a.len())
            }
            Value::Array(a) => format!("[{}]", a.preview().join(", ")),
            Value::Bool(b) => b.to_string(),
            Value::F32(f) => f.to_string(),
            Value::F64(f) => f.to_string(),
            other => other
                .as_u64()
                .map_or_else(|| format!("{other:?}"), |v| v.to_string()),
        }
    }
}

/// A ggml tensor type: id, name, elements per block and bytes per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    /// The ggml type id.
    pub id: u32,
    /// Its name.
    pub name: &'static str,
    /// Elements per block.
    pub block_elems: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

/// The ggml types whose block layout this reader knows (enough to check any tensor's size).
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// The type with id `id`, if the reader knows its layout.
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block_elems, block_bytes)| GgmlType {
                id,
                name,
                block_elems,
                block_bytes,
            })
    }

    /// The bitexact weight format of this type, when the runner supports it.
    pub fn format(self) -> Option<WeightFormat> {
        Some(match self.id {
            0 => WeightFormat::F32,
            1 => WeightFormat::F16,
            30 => WeightFormat::BF16,
            8 => WeightFormat::Q8_0,
            12 => WeightFormat::Q4K,
            13 => WeightFormat::Q5K,
            14 => WeightFormat::Q6K,
            2 => WeightFormat::Q4_0,
            3 => WeightFormat::Q4_1,
            6 => WeightFormat::Q5_0,
            7 => WeightFormat::Q5_1,
            10 => WeightFormat::Q2K,
            11 => WeightFormat::Q3K,
            20 => WeightFormat::IQ4NL,
            23 => WeightFormat::IQ4XS,
            39 => WeightFormat::MXFP4,
            _ => return None,
        })
    }

    /// The ggml type of a bitexact weight format.
    pub fn of(format: WeightFormat) -> Self {
        let id = match format {
            WeightFormat::F32 => 0,
            WeightFormat::F16 => 1,
            WeightFormat::BF16 => 30,
            WeightFormat::Q8_0 => 8,
            WeightFormat::Q4K => 12,
            WeightFormat::Q5K => 13,
            WeightFormat::Q6K => 14,
            WeightFormat::Q4_0 => 2,
            WeightFormat::Q4_1 => 3,
            WeightFormat::Q5_0 => 6,
            WeightFormat::Q5_1 => 7,
            WeightFormat::Q2K => 10,
            WeightFormat::Q3K => 11,
            WeightFormat::IQ4NL => 20,
            WeightFormat::IQ4XS => 23,
            WeightFormat::MXFP4 => 39,
        };
        Self::from_id(id).expect("every format has a ggml type")
    }
}

/// One tensor's description.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dims, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// The ggml type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes a [`GgufFile`] reads: a whole file in memory, or an open file of which only the
/// part before the tensor data (`head`) is in memory.
enum Bytes {
    Owned(Vec<u8>),
    File {
        head: Vec<u8>,
        file: std::fs::File,
        path: String,
    },
}

impl Bytes {
    /// What the parser walks: everything, or the head.
    fn parsed(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::File { head, .. } => head,
        }
    }
}

/// What parsing the part before the data yields.
struct Head {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A parsed GGUF file: metadata and tensor infos, with the data left in place.
pub struct GgufFile {
    bytes: Bytes,
    /// Length of the whole file.
    file_len: u64,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment.
    pub alignment: u64,
    /// Offset of the data section.
    pub data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// Most dims a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Deepest array nesting accepted.
const MAX_DEPTH: u32 = 4;

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> GgufResult<&'a [u8]> {
        let have = (self.b.len() - self.at) as u64;
        if n > have {
            return Err(GgufError::Truncated {
                at: self.at,
                what: what.to_string(),
                need: n,
                have,
            });
        }
        let s = &self.b[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }

    fn remaining(&self) -> u64 {
        (self.b.len() - self.at) as u64
    }

    fn u8(&mut self, what: &str) -> GgufResult<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> GgufResult<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> GgufResult<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> GgufResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count of items each at least `min_item` bytes long: refused when the rest of the file
    /// cannot hold them, so no allocation is ever sized by an unchecked count.
    fn count(&mut self, min_item: u64, what: &str) -> GgufResult<u64> {
        let n = self.u64(what)?;
        let need = n
            .checked_mul(min_item)
            .ok_or_else(|| GgufError::Malformed(format!("{what}: count {n} overflows")))?;
        if need > self.remaining() {
            return Err(GgufError::Truncated {
                at: self.at,
                what: format!("{what} ({n} items)"),
                need,
                have: self.remaining(),
            });
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> GgufResult<String> {
        let n = self.count(1, what)?;
        let at = self.at;
        let raw = self.take(n, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| GgufError::Malformed(format!("{what} at byte {at} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, what: &str) -> GgufResult<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Malformed(format!("{what}: bool byte {b}"))),
            },
            8 => Value::String(self.string(what)?),
            9 => Value::Array(self.array(0, what)?),
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => {
                return Err(GgufError::Malformed(format!(
                    "{what}: unknown value type {t}"
                )))
            }
        })
    }
}

impl Reader<'_> {
    fn array(&mut self, depth: u32, what: &str) -> GgufResult<Array> {
        if depth >= MAX_DEPTH {
            return Err(GgufError::Malformed(format!(
                "{what}: arrays nested deeper than {MAX_DEPTH}"
            )));
        }
        let elem = self.u32(what)?;
        // The smallest encoding of one element: its count check bounds every allocation below.
        let min = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            t => {
                return Err(GgufError::Malformed(format!(
                    "{what}: unknown array element type {t}"
                )))
            }
        };
        let n = self.count(min, what)? as usize;
        macro_rules! num {
            ($variant:ident, $read:ident, $conv:expr) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($conv(self.$read(what)?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match elem {
            0 => Array::U8(self.take(n as u64, what)?.to_vec()),
            1 => Array::I8(
                self.take(n as u64, what)?
                    .iter()
                    .map(|&b| b as i8)
                    .collect(),
            ),
            2 => num!(U16, u16, |x| x),
            3 => num!(I16, u16, |x: u16| x as i16),
            4 => num!(U32, u32, |x| x),
            5 => num!(I32, u32, |x: u32| x as i32),
            6 => num!(F32, u32, f32::from_bits),
            7 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(match self.u8(what)? {
                        0 => false,
                        1 => true,
                        b => return Err(GgufError::Malformed(format!("{what}: bool byte {b}"))),
                    });
                }
                Array::Bool(v)
            }
            8 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.string(what)?);
                }
                Array::String(v)
            }
            9 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array(depth + 1, what)?);
                }
                Array::Array(v)
            }
            10 => num!(U64, u64, |x| x),
            11 => num!(I64, u64, |x: u64| x as i64),
            _ => num!(F64, u64, f64::from_bits),
        })
    }
}

impl GgufFile {
    /// Parses `path`: the header, metadata and tensor infos are read into memory, the tensor
    /// data stays on disk for [`GgufFile::tensor_data`].
    pub fn open(path: impl AsRef<Path>) -> GgufResult<Self> {
        use std::io::Read;
        let path = path.as_ref();
        let shown = path.display().to_string();
        let io = |error| GgufError::Io {
            path: shown.clone(),
            error,
        };
        // A FIFO would block the open (and a device never end): regular files only.
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            let what = if meta.is_dir() {
                "a directory, not a GGUF file"
            } else {
                "not a regular file (a device, FIFO or socket), not a GGUF file"
            };
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                what,
            )));
        }
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        // Read a prefix and parse it; a head longer than the prefix (a large vocabulary in the
        // metadata) shows as a truncation inside it: read twice as much and parse again.
        let mut head = Vec::new();
        let mut want = (1u64 << 20).min(file_len);
        loop {
            head.clear();
            std::io::Seek::rewind(&mut file).map_err(io)?;
            (&mut file).take(want).read_to_end(&mut head).map_err(io)?;
            let bytes = Bytes::File {
                head: std::mem::take(&mut head),
                file,
                path: shown.clone(),
            };
            match Self::from_bytes(bytes, file_len) {
                Err((
                    GgufError::Truncated { at, .. },
                    Bytes::File {
                        head: h, file: f, ..
                    },
                )) if (at as u64) < file_len && h.len() as u64 == want && want < file_len => {
                    head = h;
                    file = f;
                    want = (want * 2).min(file_len);
                }
                Err((e, _)) => return Err(e),
                Ok(g) => return Ok(g),
            }
        }
    }

    /// Parses a file held in memory.
    pub fn parse(bytes: Vec<u8>) -> GgufResult<Self> {
        let len = bytes.len() as u64;
        Self::from_bytes(Bytes::Owned(bytes), len).map_err(|(e, _)| e)
    }

    /// Parses `bytes` (the whole file, or its head with the file `file_len` bytes long); on
    /// failure the bytes come back with the error, so that [`GgufFile::open`] can read more.
    fn from_bytes(bytes: Bytes, file_len: u64) -> Result<Self, (GgufError, Bytes)> {
        match Self::parse_head(bytes.parsed(), file_len) {
            Ok(h) => Ok(GgufFile {
                version: h.version,
                metadata: h.metadata,
                tensors: h.tensors,
                alignment: h.alignment,
                data_offset: h.data_offset,
                file_len,
                bytes,
            }),
            Err(e) => Err((e, bytes)),
        }
    }

    fn parse_head(b: &[u8], file_len: u64) -> GgufResult<Head> {
        let mut r = Reader { b, at: 0 };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(GgufError::Header(format!(
                "magic {magic:02x?} is not \"GGUF\""
            )));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Header(format!(
                "version {version} (2 and 3 are supported)"
            )));
        }
        // A tensor info is at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes;
        // a key/value pair at least 8 (key length) + 4 (type) + 1 byte.
        let n_tensors = r.count(24, "tensor count")?;
        let n_kv = r.count(13, "metadata count")?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("type of `{key}`"))?;
            let v = r.value(ty, &format!("value of `{key}`"))?;
            if !keys.insert(key.clone()) {
                return Err(GgufError::Malformed(format!(
                    "metadata key `{key}` appears twice"
                )));
            }
            metadata.push((key, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => 32,
            Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(GgufError::Malformed(format!(
                    "general.alignment must be a power-of-two u32, got {}",
                    v.display()
                )))
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor {i} name"))?;
            let n_dims = r.u32(&format!("dims of `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Malformed(format!(
                    "tensor `{name}` has {n_dims} dims (1..={MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dims of `{name}`"))?);
            }
            let type_id = r.u32(&format!("type of `{name}`"))?;
            let offset = r.u64(&format!("offset of `{name}`"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                tensor: name.clone(),
                type_id,
                type_name: "unknown".into(),
            })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e > 0)
                .ok_or_else(|| {
                    GgufError::Malformed(format!("tensor `{name}` has dims {dims:?}"))
                })?;
            if dims[0] % ty.block_elems != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor `{name}`: row of {} elements is not a multiple of the {} block ({})",
                    dims[0], ty.name, ty.block_elems
                )));
            }
            let bytes = (elements / ty.block_elems)
                .checked_mul(ty.block_bytes)
                .ok_or_else(|| GgufError::Malformed(format!("tensor `{name}` size overflows")))?;
            if offset % alignment != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor `{name}` offset {offset} is not aligned to {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(GgufError::Malformed(format!(
                    "tensor `{name}` appears twice"
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                bytes,
            });
        }
        let data_offset = (r.at as u64).next_multiple_of(alignment);
        let data_len = file_len.saturating_sub(data_offset);
        let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let end = t
                .offset
                .checked_add(t.bytes)
                .filter(|&e| e <= data_len)
                .ok_or_else(|| GgufError::Truncated {
                    at: (data_offset + t.offset.min(data_len)) as usize,
                    what: format!("data of tensor `{}`", t.name),
                    need: t.bytes,
                    have: data_len.saturating_sub(t.offset),
                })?;
            spans.push((t.offset, end, i));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(GgufError::Malformed(format!(
                    "tensors `{}` and `{}` overlap",
                    tensors[w[0].2].name, tensors[w[1].2].name
                )));
            }
        }
        Ok(Head {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data of `t` (its range was checked against the file when parsing). For an opened
    /// file, read from disk now: a file that has shrunk since it was opened gives
    /// [`GgufError::Truncated`] naming the tensor.
    pub fn tensor_data(&self, t: &TensorInfo) -> GgufResult<std::borrow::Cow<'_, [u8]>> {
        let start = self.data_offset + t.offset;
        match &self.bytes {
            Bytes::Owned(v) => Ok(std::borrow::Cow::Borrowed(
                &v[start as usize..(start + t.bytes) as usize],
            )),
            Bytes::File { file, path, .. } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; t.bytes as usize];
                let mut done = 0usize;
                while done < buf.len() {
                    match file.read_at(&mut buf[done..], start + done as u64) {
                        Ok(0) => {
                            return Err(GgufError::Truncated {
                                at: (start + done as u64) as usize,
                                what: format!(
                                "data of tensor `{}` ({path} is shorter than when it was opened)",
                                t.name
                            ),
                                need: t.bytes,
                                have: done as u64,
                            })
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(error) => {
                            return Err(GgufError::Io {
                                path: path.clone(),
                                error,
                            })
                        }
                    }
                }
                Ok(std::borrow::Cow::Owned(buf))
            }
        }
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> usize {
        self.file_len as usize
    }

    /// True for an empty file (which never parses).
    pub fn is_empty(&self) -> bool {
        self.file_len == 0
    }
}
