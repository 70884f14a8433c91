//! Hugging Face checkpoints: a directory with `config.json` and `*.safetensors` (one file, several, or a
//! `model.safetensors.index.json`), plus `tokenizer.json` / `tokenizer_config.json` when present.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use serde_json::Value;

use super::{expected_shape, LlamaConfig, ModelError, Tensor, WeightSource};

struct ShardFile {
    path: PathBuf,
    map: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A Hugging Face safetensors checkpoint seen as a [`WeightSource`].
pub struct HfSource {
    dir: PathBuf,
    config: LlamaConfig,
    files: Vec<ShardFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    description: String,
}

impl std::fmt::Debug for HfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfSource")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::malformed(path, format!("invalid JSON: {e}")))
}

impl HfSource {
    /// Opens the checkpoint in directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_hf_json(&read_json(&dir.join("config.json"))?)?;
        let index_path = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index_path.is_file() {
            let idx = read_json(&index_path)?;
            let map = idx
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| ModelError::malformed(&index_path, "no `weight_map` object"))?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::malformed(&index_path, format!("weight_map[{tensor}] is not a string"))
                })?;
                let plain = Path::new(file)
                    .file_name()
                    .map(|f| f == std::ffi::OsStr::new(file))
                    .unwrap_or(false);
                if !plain || file == ".." {
                    return Err(ModelError::malformed(
                        &index_path,
                        format!("weight_map[{tensor}] = `{file}` is not a file name in the checkpoint directory"),
                    ));
                }
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
            }
            names.sort();
            names
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            let mut names = Vec::new();
            for entry in rd {
                let entry = entry.map_err(|e| ModelError::io(dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors") {
                    names.push(name);
                }
            }
            names.sort();
            names
        };
        if file_names.is_empty() {
            return Err(ModelError::malformed(
                dir,
                "no *.safetensors file in the checkpoint directory",
            ));
        }
        let mut files = Vec::with_capacity(file_names.len());
        let mut index = HashMap::new();
        let mut dtypes: Vec<Dtype> = Vec::new();
        for name in &file_names {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: read-only private map; we require that the checkpoint is not truncated or rewritten while
            // it is open (outside what any mmap-based loader can defend against). Every access below is a
            // bounds-checked slice of ranges validated by `read_metadata` against the file length.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::malformed(&path, format!("safetensors header: {e}")))?;
            let i = files.len();
            for (tname, info) in metadata.tensors() {
                if let Some(prev) = index.insert(tname.clone(), i) {
                    return Err(ModelError::malformed(
                        &path,
                        format!("tensor `{tname}` also appears in {}", file_names[prev]),
                    ));
                }
                if tname.ends_with("proj.weight") && !dtypes.contains(&info.dtype) {
                    dtypes.push(info.dtype);
                }
            }
            files.push(ShardFile {
                path,
                map,
                header_len,
                metadata,
            });
        }
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        let dt: Vec<String> = dtypes.iter().map(|d| format!("{d:?}")).collect();
        let description = format!(
            "safetensors {name} ({}, {} layers)",
            if dt.is_empty() {
                "no matrices".into()
            } else {
                dt.join("+")
            },
            config.num_hidden_layers
        );
        Ok(HfSource {
            dir: dir.to_path_buf(),
            config,
            files,
            index,
            description,
        })
    }

    /// A releaser for `bytes` (a slice [`HfSource::raw`] returned): their pages are unmapped from this process
    /// once copied out, see [`super::gguf::GgufFile::release_pages`].
    fn releaser(&self, bytes: &[u8]) -> super::Releaser<'_> {
        let at = bytes.as_ptr() as usize;
        match self.files.iter().find(|f| {
            let base = f.map.as_ptr() as usize;
            at >= base && at + bytes.len() <= base + f.map.len()
        }) {
            Some(f) => super::Releaser::new(Some(&f.map), at - f.map.as_ptr() as usize),
            None => super::Releaser::new(None, 0),
        }
    }

    /// [`convert`]s `bytes` into `out` a chunk at a time, releasing each chunk's pages once it is converted.
    fn convert_released(&self, name: &str, dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<(), ModelError> {
        let width = dtype_width(name, dtype)?;
        if bytes.len() != out.len() * width {
            return Err(ModelError::tensor(
                name,
                format!("{} bytes for {} {dtype:?} values", bytes.len(), out.len()),
            ));
        }
        let per = (super::RELEASE_CHUNK / width).max(1);
        let mut release = self.releaser(bytes);
        for (i, (o, b)) in out.chunks_mut(per).zip(bytes.chunks(per * width)).enumerate() {
            convert(name, dtype, b, o)?;
            release.touched(i * per * width..i * per * width + b.len());
        }
        release.finish();
        Ok(())
    }

    /// The bytes, dtype and shape of a stored tensor.
    fn raw(&self, name: &str) -> Result<(&[u8], Dtype, Vec<usize>), ModelError> {
        let missing = || ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.description.clone(),
        };
        let expected = expected_shape(&self.config, name).ok_or_else(missing)?;
        let stored = if name == "lm_head.weight" && self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            name
        };
        let &fi = self.index.get(stored).ok_or_else(missing)?;
        let f = &self.files[fi];
        let info = f.metadata.info(stored).ok_or_else(missing)?;
        if info.shape != expected {
            return Err(ModelError::tensor(
                stored,
                format!(
                    "shape {:?} in {}, expected {expected:?} from the config",
                    info.shape,
                    f.path.display()
                ),
            ));
        }
        let start = 8 + f.header_len;
        let (a, b) = info.data_offsets;
        let bytes = f
            .map
            .get(start + a..start + b)
            .ok_or_else(|| ModelError::tensor(stored, format!("data {a}..{b} outside {}", f.path.display())))?;
        Ok((bytes, info.dtype, info.shape.clone()))
    }
}

fn dtype_width(name: &str, dtype: Dtype) -> Result<usize, ModelError> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::F16 | Dtype::BF16 => Ok(2),
        Dtype::F64 => Ok(8),
        other => Err(ModelError::tensor(
            name,
            format!("dtype {other:?} is not supported (f32/f16/bf16)"),
        )),
    }
}

fn convert(name: &str, dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<(), ModelError> {
    let width = dtype_width(name, dtype)?;
    if bytes.len() != out.len() * width {
        return Err(ModelError::tensor(
            name,
            format!("{} bytes for {} {dtype:?} values", bytes.len(), out.len()),
        ));
    }
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(width)) {
        *o = match dtype {
            Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            Dtype::F16 => f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
            Dtype::BF16 => bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
            _ => f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32,
        };
    }
    Ok(())
}

impl WeightSource for HfSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        let (bytes, dtype, shape) = self.raw(name)?;
        let mut data = vec![0f32; shape.iter().product()];
        self.convert_released(name, dtype, bytes, &mut data)?;
        Ok(Tensor { shape, data })
    }

    fn tensor_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor, ModelError> {
        let (bytes, dtype, mut shape) = self.raw(name)?;
        if rows.start > rows.end || rows.end > shape[0] {
            return Err(ModelError::InvalidInput(format!(
                "tensor `{name}`: rows {rows:?} out of 0..{}",
                shape[0]
            )));
        }
        let row_len: usize = shape[1..].iter().product();
        let width = dtype_width(name, dtype)?;
        shape[0] = rows.len();
        let mut data = vec![0f32; rows.len() * row_len];
        let sub = bytes
            .get(rows.start * row_len * width..rows.end * row_len * width)
            .ok_or_else(|| ModelError::tensor(name, "data shorter than its shape"))?;
        self.convert_released(name, dtype, sub, &mut data)?;
        Ok(Tensor { shape, data })
    }

    fn tensor_cols(&self, name: &str, cols: Range<usize>) -> Result<Tensor, ModelError> {
        let (bytes, dtype, shape) = self.raw(name)?;
        let [rows, full] = shape[..] else {
            return Err(ModelError::InvalidInput(format!(
                "tensor `{name}`: columns of a {}-D tensor",
                shape.len()
            )));
        };
        super::check_cols(name, &cols, full)?;
        let width = dtype_width(name, dtype)?;
        if bytes.len() != rows * full * width {
            return Err(ModelError::tensor(name, "data shorter than its shape"));
        }
        let (n, row_bytes) = (cols.len(), full * width);
        let mut data = vec![0f32; rows * n];
        let mut release = self.releaser(bytes);
        for r in 0..rows {
            let row = r * row_bytes..(r + 1) * row_bytes;
            convert(
                name,
                dtype,
                &bytes[row.clone()][cols.start * width..cols.end * width],
                &mut data[r * n..(r + 1) * n],
            )?;
            release.touched(row);
        }
        release.finish();
        Ok(Tensor {
            shape: vec![rows, cols.len()],
            data,
        })
    }

    fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>, ModelError> {
        let p = self.dir.join("tokenizer.json");
        if !p.is_file() {
            return Ok(None);
        }
        tokenizers::Tokenizer::from_file(&p)
            .map(Some)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", p.display())))
    }

    fn chat_template(&self) -> Option<String> {
        if let Ok(t) = std::fs::read_to_string(self.dir.join("chat_template.jinja")) {
            return Some(t);
        }
        let cfg = read_json(&self.dir.join("tokenizer_config.json")).ok()?;
        match cfg.get("chat_template")? {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            Value::Array(a) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}
