//! The crate's error type: every failure a caller can cause or meet comes back as one of these.

use cudarc::driver::{sys::CUresult, DriverError};

/// Result alias used throughout bitexact.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in bitexact.
///
/// Validation errors (`ShapeMismatch`, `IndexOutOfRange`, `InvalidArgument`) are raised before
/// any device work is queued, so a call that returns one has written nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable CUDA device: the driver library is missing, no device is present, or the
    /// ordinal does not exist.
    #[error("no CUDA device: {reason}")]
    NoDevice {
        /// Why the device could not be opened.
        reason: String,
    },

    /// NVRTC is not installed (`libnvrtc` could not be loaded).
    #[error("NVRTC (libnvrtc) could not be loaded: it is needed to compile the kernels")]
    NvrtcMissing,

    /// NVRTC rejected a kernel family; `log` is NVRTC's own log.
    #[error("NVRTC failed to compile `{kernel}` with {options:?}:\n{log}")]
    Compile {
        /// Kernel family (the `cuda/*.cu` file stem).
        kernel: &'static str,
        /// The options the compile ran with.
        options: Vec<String>,
        /// NVRTC's program log.
        log: String,
    },

    /// A tensor's shape is not the one the operation needs.
    #[error("{op}: `{what}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The operation that checked.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// The shape the operation needs.
        expected: Vec<usize>,
        /// The shape it was given.
        got: Vec<usize>,
    },

    /// An index (an expert id, a token row, an output row) lies outside its range.
    #[error("{op}: `{what}`[{position}] = {index} is out of range 0..{bound}")]
    IndexOutOfRange {
        /// The operation that checked.
        op: &'static str,
        /// Which index array.
        what: &'static str,
        /// Position of the offending entry in that array.
        position: usize,
        /// The offending value.
        index: u64,
        /// The exclusive upper bound.
        bound: u64,
    },

    /// An argument is invalid for a reason other than its shape.
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The operation that checked.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },

    /// The device could not allocate the memory an operation needs.
    #[error("device out of memory while allocating {bytes} bytes for {what}")]
    OutOfMemory {
        /// Bytes requested.
        bytes: usize,
        /// What the allocation was for.
        what: &'static str,
    },

    /// A failure injected by [`crate::Device::inject_launch_failure`] (tests only).
    #[error("injected launch failure at kernel `{kernel}`")]
    InjectedFault {
        /// The kernel whose launch was refused.
        kernel: &'static str,
    },

    /// A vocabulary could not be read, or text not encoded or decoded with it.
    #[error("tokenizer: {what}")]
    Tokenizer {
        /// What is wrong, naming the key, value or token.
        what: String,
    },

    /// A GGUF file could not be read, written or mapped onto a model.
    #[error("gguf: {0}")]
    Gguf(#[from] GgufError),

    /// Any other CUDA driver error.
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
}

impl Error {
    /// Maps an allocation failure to [`Error::OutOfMemory`], other driver errors unchanged.
    pub(crate) fn from_alloc(err: DriverError, bytes: usize, what: &'static str) -> Self {
        if err.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::OutOfMemory { bytes, what }
        } else {
            Error::Driver(err)
        }
    }

    pub(crate) fn shape(
        op: &'static str,
        what: &'static str,
        expected: &[usize],
        got: &[usize],
    ) -> Self {
        Error::ShapeMismatch {
            op,
            what,
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}

/// What can be wrong with a GGUF file. (Defined beside [`Error`] so that the error types
/// depend on nothing else in the crate; [`crate::gguf`] re-exports it.)
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Reading the file failed.
    #[error("reading {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The error (in the message once; not also a `source`, which printers would repeat).
        error: std::io::Error,
    },
    /// The file is not GGUF, or is a version this reader does not know.
    #[error("not a GGUF v2/v3 file: {0}")]
    Header(String),
    /// The file ends before something it declares.
    #[error("truncated at byte {at}: {what} needs {need} more bytes, {have} remain")]
    Truncated {
        /// Offset of the read.
        at: usize,
        /// What was being read.
        what: String,
        /// Bytes needed.
        need: u64,
        /// Bytes left.
        have: u64,
    },
    /// A value the format forbids or this reader cannot represent.
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    /// A tensor of a type the runner does not support.
    #[error("tensor `{tensor}` has ggml type {type_name} ({type_id}), which bitexact does not support (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4; the IQ1, IQ2, IQ3 and TQ codebook formats are not supported)")]
    UnsupportedType {
        /// The tensor.
        tensor: String,
        /// The ggml type id.
        type_id: u32,
        /// Its name, when known.
        type_name: String,
    },
    /// The model is not one the runner can build.
    #[error("unsupported model: {0}")]
    Model(String),
}

/// Fails with [`Error::ShapeMismatch`] unless `got == expected`.
pub(crate) fn check_shape(
    op: &'static str,
    what: &'static str,
    expected: &[usize],
    got: &[usize],
) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::shape(op, what, expected, got))
    }
}

/// Fails with [`Error::IndexOutOfRange`] at the first entry of `idx` that is not `< bound`.
pub(crate) fn check_indices(
    op: &'static str,
    what: &'static str,
    idx: &[u32],
    bound: usize,
) -> Result<()> {
    match idx.iter().position(|&i| i as usize >= bound) {
        None => Ok(()),
        Some(position) => Err(Error::IndexOutOfRange {
            op,
            what,
            position,
            index: u64::from(idx[position]),
            bound: bound as u64,
        }),
    }
}
