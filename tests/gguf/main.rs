//! GGUF: our reader against our writer and against the Python `gguf` package (llama.cpp's), and
//! a fuzzer over malformed files. CPU only.

mod alloc;
mod fuzz;
mod pyref;
mod reader;
