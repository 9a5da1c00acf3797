//! Opening GGUF files: header parsing, validation and typed metadata access.
//!
//! A file is checked as a whole before any model is built from it: every
//! tensor's data must lie inside the file (a truncated download fails here,
//! naming the tensor), and metadata is read through getters that turn a
//! missing or mistyped key into [`EngineError::Metadata`] naming the key.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{EngineError, Result};

/// An opened, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    size: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let size = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| EngineError::bad_file(path, format!("not a readable GGUF file: {e}")))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if block == 0 || elems % block != 0 {
                return Err(EngineError::bad_file(
                    path,
                    format!(
                        "tensor `{name}` has {elems} elements, not a multiple of its block size"
                    ),
                ));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|o| o.checked_add(bytes));
            if end.is_none_or(|end| end > size) {
                return Err(EngineError::bad_file(
                    path,
                    format!(
                        "truncated: tensor `{name}` extends past the end of the file ({size} bytes); download it again"
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_type(&self, name: &str) -> Option<GgmlDType> {
        self.content.tensor_infos.get(name).map(|t| t.ggml_dtype)
    }

    /// Reads a tensor; its absence or a read failure names the tensor.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::bad_file(
                &self.path,
                format!("missing tensor `{name}`"),
            ));
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| EngineError::bad_file(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Reads a tensor and checks its shape (outermost dimension first, as candle orders them).
    pub fn tensor_shaped(&mut self, name: &str, dims: &[usize]) -> Result<QTensor> {
        let t = self.tensor(name)?;
        if t.shape().dims() != dims {
            return Err(EngineError::bad_file(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    t.shape().dims(),
                    dims
                ),
            ));
        }
        Ok(t)
    }

    pub fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_string(&self, key: &str) -> Result<String> {
        match self.value(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(EngineError::Metadata(format!("`{key}` is not a string"))),
            None => Err(EngineError::Metadata(format!("`{key}` is missing"))),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .value(key)
            .ok_or_else(|| EngineError::Metadata(format!("`{key}` is missing")))?;
        value_as_u64(v).ok_or_else(|| EngineError::Metadata(format!("`{key}` is not an integer")))
    }

    pub fn get_usize(&self, key: &str) -> Result<usize> {
        usize::try_from(self.get_u64(key)?)
            .map_err(|_| EngineError::Metadata(format!("`{key}` is too large")))
    }

    pub fn get_usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.value(key).is_some() {
            self.get_usize(key)
        } else {
            Ok(default)
        }
    }

    pub fn get_f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.value(key) {
            None => Ok(default),
            Some(Value::F32(v)) => Ok(*v),
            Some(Value::F64(v)) => Ok(*v as f32),
            Some(v) => value_as_u64(v)
                .map(|x| x as f32)
                .ok_or_else(|| EngineError::Metadata(format!("`{key}` is not a number"))),
        }
    }

    pub fn architecture(&self) -> Result<String> {
        self.get_string("general.architecture")
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// Human name of a GGUF tensor type, as llama.cpp prints it.
pub fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn garbage_is_a_bad_file_error() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { return };
        let p = dir.path().join("x.gguf");
        if let Ok(mut f) = File::create(&p) {
            let _ = f.write_all(b"this is not a gguf file at all");
        }
        assert!(matches!(
            GgufFile::open(&p),
            Err(EngineError::BadModelFile { .. })
        ));
    }

    #[test]
    fn missing_file_is_an_io_error() {
        assert!(matches!(
            GgufFile::open(Path::new("/nonexistent/kiln/model.gguf")),
            Err(EngineError::Io { .. })
        ));
    }
}
