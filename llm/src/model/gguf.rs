//! A bounded GGUF reader (and a small writer for tests and fixtures), and the [`WeightSource`] over a GGUF file.
//!
//! Written here rather than taken from a crate: the GGUF crates on crates.io (`ggus`, `gguf`, `gguf-rs`) either
//! pre-allocate from header counts, panic on large lengths, or read enum values straight from untrusted bytes.
//! This parser checks every count and length against the bytes that remain before allocating, so a lying
//! header gives a [`ModelError::Malformed`] naming the field, never a panic or a huge allocation.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::dequant::{dequantize, GgmlType};
use super::{expected_shape, LlamaConfig, ModelError, QuantRows, RopeScaling, Tensor, WeightSource};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
/// GGML's limit on tensor rank.
const MAX_DIMS: usize = 4;
/// Nesting limit for arrays of arrays in metadata.
const MAX_DEPTH: usize = 4;
/// At most this many items are reserved ahead from a count read in the file. A count is only checked
/// against the bytes left, and each parsed item takes more memory than its smallest encoding (32 bytes for a
/// one-byte value), so reserving all of it would let a lying count cost up to 32× the file size before the
/// lie shows; beyond this the vectors grow with what was really parsed.
const PREALLOC_MAX: usize = 1024;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MetaValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    Str(String),
    /// Type 9 (all elements of one type).
    Array(Vec<MetaValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, whatever its integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (from a float or an integer).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// Where one tensor lives in a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// Name as stored (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<usize>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: usize,
    /// Number of elements.
    pub n_elements: usize,
    /// Number of bytes, when the type's layout is known.
    pub n_bytes: Option<usize>,
}

impl GgufTensorInfo {
    /// Shape outermost first (the reverse of [`dims`](Self::dims)), as a row-major array would have it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor directory; tensor bytes are read on demand.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: usize,
    alignment: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: String) -> ModelError {
        ModelError::malformed(self.path, format!("{msg} (at byte {})", self.pos))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what}: needs {n} bytes, only {} left in the file",
                self.remaining()
            )));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize, ModelError> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(self.err(format!(
                "{what} = {n} cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.count(1, &format!("{what} length"))?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, ModelError> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => match self.arr::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err(format!("metadata `{key}`: boolean byte {b}"))),
            },
            8 => MetaValue::Str(self.string(&format!("metadata `{key}`"))?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(format!("metadata `{key}`: arrays nested deeper than {MAX_DEPTH}")));
                }
                let ety = self.u32(key)?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.err(format!("metadata `{key}`: unknown array element type {t}"))),
                };
                let n = self.count(min, &format!("metadata `{key}` array length"))?;
                let mut v = Vec::with_capacity(n.min(PREALLOC_MAX));
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(self.err(format!("metadata `{key}`: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; like every mmap-based model loader we
        // require that nobody truncates or rewrites the model file while it is open (doing so is outside what
        // this library can defend against). All reads through the map are bounds-checked slices.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path.to_path_buf(), Backing::Map(map))
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, ModelError> {
        Self::parse(name.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<Self, ModelError> {
        let b = backing.bytes();
        let mut c = Cursor { b, pos: 0, path: &path };
        if c.take(4, "magic")? != MAGIC {
            return Err(ModelError::malformed(&path, "not a GGUF file (magic is not `GGUF`)"));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() <= 3 {
                " (a big-endian file?)"
            } else {
                ""
            };
            return Err(ModelError::malformed(
                &path,
                format!("GGUF version {version} is not supported{hint}"),
            ));
        }
        let n_tensors = c.count(4 + 8 + 4 + 8 + 8 + 4, "tensor count")?;
        let n_kv = c.count(8 + 4 + 1, "metadata count")?;
        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_MAX));
        let mut meta_index = HashMap::with_capacity(n_kv.min(PREALLOC_MAX));
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(ModelError::malformed(
                    &path,
                    format!("metadata key `{key}` appears twice"),
                ));
            }
            metadata.push((key, v));
        }
        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => {
                    return Err(ModelError::malformed(
                        &path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ))
                }
            },
        };
        let mut infos = Vec::with_capacity(n_tensors.min(PREALLOC_MAX));
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ModelError::malformed(
                    &path,
                    format!("tensor `{name}`: {n_dims} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                dims.push(usize::try_from(d).map_err(|_| ModelError::tensor(&name, format!("dimension {d}")))?);
            }
            let ty = GgmlType::from_id(c.u32(&name)?);
            let offset = c.u64(&name)?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        if n_tensors > 0 && data_start > b.len() {
            // Even empty tensors need the data section to start inside the file (llama.cpp pads up to it).
            return Err(ModelError::malformed(
                &path,
                format!(
                    "the data section starts at byte {data_start} (after alignment to {alignment}), past the \
                     end of the {}-byte file (truncated file?)",
                    b.len()
                ),
            ));
        }
        let data_len = b.len().saturating_sub(data_start);
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for (name, dims, ty, offset) in infos {
            let bad = |msg: String| ModelError::malformed(&path, format!("tensor `{name}`: {msg}"));
            let n_elements = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= isize::MAX as usize / 8)
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let n_bytes = match ty.block() {
                None => None,
                Some((bs, _)) => {
                    if dims[0] % bs != 0 {
                        return Err(bad(format!(
                            "row length {} is not a multiple of the {ty} block {bs}",
                            dims[0]
                        )));
                    }
                    ty.bytes_for(n_elements)
                }
            };
            let offset = usize::try_from(offset).map_err(|_| bad(format!("offset {offset}")))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if let Some(nb) = n_bytes {
                if offset.checked_add(nb).is_none_or(|end| end > data_len) {
                    return Err(bad(format!(
                        "data {offset}..{} lies outside the {data_len}-byte data section (truncated file?)",
                        offset as u128 + nb as u128
                    )));
                }
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("name appears twice".into()));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }
        Ok(GgufFile {
            path,
            backing,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            data_start,
            alignment,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// One tensor's directory entry.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked when the file was parsed).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], ModelError> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.path.display().to_string(),
        })?;
        let nb = info
            .n_bytes
            .ok_or_else(|| ModelError::tensor(name, format!("element type {} has an unknown layout", info.ty)))?;
        let start = self.data_start + info.offset;
        // Checked when the file was parsed; kept fallible so that a gap in those checks is an error, not a panic.
        self.backing
            .bytes()
            .get(start..start + nb)
            .ok_or_else(|| ModelError::tensor(name, format!("data {start}..{} lies outside the file", start + nb)))
    }

    /// Unmaps the pages of tensor `name` from this process (they stay in the kernel's page cache, and a later
    /// read maps them again), so that a tensor copied out of the map stops counting towards the process's
    /// resident memory: a rank that reads its shard of a large checkpoint holds its shard, not the file's
    /// pages too. Does nothing for an in-memory image or an unknown tensor.
    pub fn release_pages(&self, name: &str) {
        let Backing::Map(map) = &self.backing else {
            return;
        };
        let Some((offset, nb)) = self.tensor_info(name).and_then(|i| Some((i.offset, i.n_bytes?))) else {
            return;
        };
        let start = self.data_start + offset;
        if start.checked_add(nb).is_none_or(|end| end > map.len()) {
            return;
        }
        super::release_map_range(map, start, nb);
    }

    /// A releaser for tensor `name`'s mapped pages (see [`super::Releaser`]).
    fn releaser(&self, name: &str) -> super::Releaser<'_> {
        match (&self.backing, self.tensor_info(name)) {
            (Backing::Map(m), Some(i)) => super::Releaser::new(Some(m), self.data_start + i.offset),
            _ => super::Releaser::new(None, 0),
        }
    }

    /// A whole tensor dequantized to f32, shape outermost first. The mapped pages already converted are
    /// released every 16 MiB, so a large f16 or f32 tensor does not stay
    /// resident next to its copy.
    pub fn dequantize(&self, name: &str) -> Result<Tensor, ModelError> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.path.display().to_string(),
        })?;
        let bytes = self.tensor_bytes(name)?;
        let mut data = vec![0f32; info.n_elements];
        let shape = info.shape();
        let row_len: usize = shape.get(1..).map_or(1, |d| d.iter().product());
        let err = |e: ModelError| ModelError::tensor(name, e.to_string());
        match info.ty.bytes_for(row_len).filter(|_| row_len > 0 && shape.len() > 1) {
            // Whole rows are whole blocks: convert and release a group of rows at a time.
            Some(row_bytes) if row_bytes * shape[0] == bytes.len() => {
                let rows_per = (super::RELEASE_CHUNK / row_bytes.max(1)).max(1);
                let mut release = self.releaser(name);
                for (i, (src, dst)) in bytes
                    .chunks(rows_per * row_bytes)
                    .zip(data.chunks_mut(rows_per * row_len))
                    .enumerate()
                {
                    dequantize(info.ty, src, dst).map_err(err)?;
                    let at = i * rows_per * row_bytes;
                    release.touched(at..at + src.len());
                }
            }
            _ => dequantize(info.ty, bytes, &mut data).map_err(err)?,
        }
        Ok(Tensor { shape, data })
    }

    /// Rows `rows` (in the outermost dimension) of a tensor, after mapping each wanted row `r` to the stored row
    /// `map(r)`.
    fn dequantize_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        map: impl Fn(usize) -> usize,
    ) -> Result<Tensor, ModelError> {
        let info = self.tensor_info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.path.display().to_string(),
        })?;
        let shape = info.shape();
        let n_rows = shape[0];
        if rows.start > rows.end || rows.end > n_rows {
            return Err(ModelError::InvalidInput(format!(
                "tensor `{name}`: rows {rows:?} out of 0..{n_rows}"
            )));
        }
        let row_len: usize = shape[1..].iter().product();
        let mut out_shape = shape.clone();
        out_shape[0] = rows.len();
        let mut data = vec![0f32; rows.len() * row_len];
        match info.ty.bytes_for(row_len) {
            Some(row_bytes) if row_len > 0 => {
                let bytes = self.tensor_bytes(name)?;
                let mut release = self.releaser(name);
                for (i, r) in rows.enumerate() {
                    let src = map(r) * row_bytes..(map(r) + 1) * row_bytes;
                    dequantize(info.ty, &bytes[src.clone()], &mut data[i * row_len..(i + 1) * row_len])
                        .map_err(|e| ModelError::tensor(name, e.to_string()))?;
                    release.touched(src);
                }
            }
            _ => {
                // Rows are not whole blocks (e.g. a 1-D quantized tensor): dequantize everything, then pick.
                let all = self.dequantize(name)?;
                for (i, r) in rows.enumerate() {
                    let src = map(r);
                    data[i * row_len..(i + 1) * row_len].copy_from_slice(&all.data[src * row_len..(src + 1) * row_len]);
                }
            }
        }
        Ok(Tensor { shape: out_shape, data })
    }
}

/// Builds GGUF images (version 3): used by tests and to write small fixtures.
#[derive(Debug, Default, Clone)]
pub struct GgufWriter {
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn meta(mut self, key: &str, v: MetaValue) -> Self {
        self.kvs.push((key.into(), v));
        self
    }

    /// Adds a tensor with `shape` given outermost first (it is stored reversed, GGUF-style) and its raw bytes.
    pub fn tensor(mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: Vec<u8>) -> Self {
        self.tensors.push((name.into(), shape.to_vec(), ty, bytes));
        self
    }

    /// Adds an f32 tensor.
    pub fn tensor_f32(self, name: &str, shape: &[usize], data: &[f32]) -> Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, shape, GgmlType::F32, bytes)
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(*x as u8),
            MetaValue::Str(s) => Self::put_str(out, s),
            MetaValue::Array(a) => {
                let ety = a.first().map_or(0, MetaValue::type_id);
                out.extend_from_slice(&ety.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for e in a {
                    Self::put_value(out, e);
                }
            }
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// The file image.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            Self::put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let align = DEFAULT_ALIGNMENT;
        let mut offset = 0usize;
        for (name, shape, ty, bytes) in &self.tensors {
            Self::put_str(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(align) * align;
        }
        out.resize(out.len().div_ceil(align) * align, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().div_ceil(align) * align, 0);
        }
        out
    }

    /// Writes the file image to `path`.
    pub fn write(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, self.to_bytes()).map_err(|e| ModelError::io(path, e))
    }
}

/// How a canonical tensor's rows are stored in GGUF.
#[derive(Clone, Copy)]
enum RowOrder {
    Same,
    /// llama.cpp's converter interleaves the two halves of every head of Q and K (for its adjacent-pair RoPE);
    /// the canonical (rotate-half) row `h*d + s*d/2 + j` is stored at row `h*d + 2*j + s`.
    RopeInterleaved {
        head_dim: usize,
    },
}

impl RowOrder {
    fn map(self, r: usize) -> usize {
        match self {
            RowOrder::Same => r,
            RowOrder::RopeInterleaved { head_dim } => {
                let half = head_dim / 2;
                let (h, w) = (r / head_dim, r % head_dim);
                let (s, j) = (w / half, w % half);
                h * head_dim + 2 * j + s
            }
        }
    }
}

/// The GGUF name of a canonical Hugging Face Llama tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let g = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}

/// A GGUF file seen as a [`WeightSource`] (tensors dequantized to f32 on request, Q/K rows restored to the
/// rotate-half order).
pub struct GgufSource {
    file: GgufFile,
    config: LlamaConfig,
    description: String,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource")
            .field("file", &self.file)
            .field("config", &self.config)
            .finish()
    }
}

impl GgufSource {
    /// Opens and checks a GGUF Llama model.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Wraps an already parsed file.
    pub fn from_file(file: GgufFile) -> Result<Self, ModelError> {
        let config = config_from_gguf(&file)?;
        let mut counts: HashMap<GgmlType, usize> = HashMap::new();
        for t in file.tensors().iter().filter(|t| t.dims.len() >= 2) {
            *counts.entry(t.ty).or_default() += 1;
        }
        let main_ty = counts
            .iter()
            .max_by_key(|(ty, n)| (**n, ty.id()))
            .map(|(ty, _)| ty.to_string());
        let stem = file
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = stem
            .split('.')
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or(stem);
        let description = format!(
            "GGUF {name} ({}, {} layers)",
            main_ty.unwrap_or_else(|| "no matrices".into()),
            config.num_hidden_layers
        );
        Ok(GgufSource {
            file,
            config,
            description,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn resolve(&self, name: &str) -> Result<(String, RowOrder, Vec<usize>), ModelError> {
        let missing = || ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.description.clone(),
        };
        let expected = expected_shape(&self.config, name).ok_or_else(missing)?;
        let mut g = gguf_name(name).ok_or_else(missing)?;
        if name == "lm_head.weight" && self.config.tie_word_embeddings {
            g = "token_embd.weight".into();
        }
        let info = self.file.tensor_info(&g).ok_or_else(missing)?;
        if !info.ty.can_dequantize() {
            return Err(ModelError::tensor(
                &g,
                format!("element type {} is not supported", info.ty),
            ));
        }
        let shape = info.shape();
        // GGUF writes 1-D norms as [n]; accept them as the expected [n].
        if shape != expected {
            return Err(ModelError::tensor(
                &g,
                format!("shape {shape:?} (outermost first), expected {expected:?} for `{name}` from the config"),
            ));
        }
        let order = if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight") {
            RowOrder::RopeInterleaved {
                head_dim: self.config.head_dim,
            }
        } else {
            RowOrder::Same
        };
        Ok((g, order, shape))
    }
}

impl GgufSource {
    /// How matrix `name` is stored when it is `Q4_0`, `Q4_1` or `Q8_0` blocks with whole blocks per row,
    /// `None` otherwise.
    fn quantized_layout(&self, name: &str) -> Result<Option<QuantLayout>, ModelError> {
        let (g, order, shape) = self.resolve(name)?;
        let info = self.file.tensor_info(&g).ok_or_else(|| ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.description.clone(),
        })?;
        if !matches!(info.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) || shape.len() != 2 {
            return Ok(None);
        }
        let (rows, cols) = (shape[0], shape[1]);
        let ty = info.ty;
        Ok(ty.bytes_for(cols).filter(|_| cols > 0).map(|row_bytes| QuantLayout {
            g,
            order,
            ty,
            rows,
            cols,
            row_bytes,
        }))
    }
}

/// A block-quantized matrix in the file (see [`GgufSource::quantized_layout`]).
struct QuantLayout {
    g: String,
    order: RowOrder,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl WeightSource for GgufSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Tensor, ModelError> {
        let (g, order, shape) = self.resolve(name)?;
        let t = match order {
            RowOrder::Same => self.file.dequantize(&g),
            _ => self.file.dequantize_rows(&g, 0..shape[0], |r| order.map(r)),
        };
        self.file.release_pages(&g);
        t
    }

    fn tensor_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor, ModelError> {
        let (g, order, _) = self.resolve(name)?;
        let t = self.file.dequantize_rows(&g, rows, |r| order.map(r));
        self.file.release_pages(&g);
        t
    }

    fn tensor_cols(&self, name: &str, cols: Range<usize>) -> Result<Tensor, ModelError> {
        let (g, order, shape) = self.resolve(name)?;
        let info = self.file.tensor_info(&g).ok_or_else(|| ModelError::MissingTensor {
            name: name.into(),
            source_desc: self.description.clone(),
        })?;
        let [rows, full] = shape[..] else {
            return Err(ModelError::InvalidInput(format!(
                "tensor `{name}`: columns of a {}-D tensor",
                shape.len()
            )));
        };
        super::check_cols(name, &cols, full)?;
        let Some(row_bytes) = info.ty.bytes_for(full).filter(|_| full > 0) else {
            // Rows are not whole blocks: only the whole tensor can be dequantized.
            return super::columns_of(name, &self.tensor(name)?, cols);
        };
        let bytes = self.file.tensor_bytes(&g)?;
        let mut data = vec![0f32; rows * cols.len()];
        let deq = |src: &[u8], out: &mut [f32]| {
            dequantize(info.ty, src, out).map_err(|e| ModelError::tensor(&g, e.to_string()))
        };
        let mut release = self.file.releaser(&g);
        match super::block_bytes_of(info.ty, &cols) {
            // Columns on block boundaries: dequantize only their blocks.
            Some(b) => {
                for (r, out) in data.chunks_exact_mut(cols.len().max(1)).take(rows).enumerate() {
                    let src = order.map(r) * row_bytes;
                    deq(&bytes[src + b.start..src + b.end], out)?;
                    release.touched(src..src + row_bytes);
                }
            }
            None => {
                let mut row = vec![0f32; full];
                for (r, out) in data.chunks_exact_mut(cols.len().max(1)).take(rows).enumerate() {
                    let src = order.map(r) * row_bytes;
                    deq(&bytes[src..src + row_bytes], &mut row)?;
                    out.copy_from_slice(&row[cols.clone()]);
                    release.touched(src..src + row_bytes);
                }
            }
        }
        self.file.release_pages(&g);
        Ok(Tensor {
            shape: vec![rows, cols.len()],
            data,
        })
    }

    fn tensor_rows_quantized(&self, name: &str, rows: Range<usize>) -> Result<Option<QuantRows>, ModelError> {
        let Some(QuantLayout {
            g,
            order,
            ty,
            rows: n_rows,
            cols,
            row_bytes,
        }) = self.quantized_layout(name)?
        else {
            return Ok(None);
        };
        if rows.start > rows.end || rows.end > n_rows {
            return Err(ModelError::InvalidInput(format!(
                "tensor `{name}`: rows {rows:?} out of 0..{n_rows}"
            )));
        }
        let bytes = self.file.tensor_bytes(&g)?;
        let mut data = Vec::with_capacity(rows.len() * row_bytes);
        let mut release = self.file.releaser(&g);
        for r in rows.clone() {
            let src = order.map(r) * row_bytes..(order.map(r) + 1) * row_bytes;
            data.extend_from_slice(&bytes[src.clone()]);
            release.touched(src);
        }
        self.file.release_pages(&g);
        Ok(Some(QuantRows {
            ty,
            rows: rows.len(),
            cols,
            row_bytes,
            data,
        }))
    }

    fn tensor_cols_quantized(&self, name: &str, cols: Range<usize>) -> Result<Option<QuantRows>, ModelError> {
        let Some(QuantLayout {
            g,
            order,
            ty,
            rows: n_rows,
            cols: full,
            row_bytes,
        }) = self.quantized_layout(name)?
        else {
            return Ok(None);
        };
        super::check_cols(name, &cols, full)?;
        let Some(Range { start: b0, end: b1 }) = super::block_bytes_of(ty, &cols) else {
            return Ok(None);
        };
        let bytes = self.file.tensor_bytes(&g)?;
        let mut data = Vec::with_capacity(n_rows * (b1 - b0));
        let mut release = self.file.releaser(&g);
        for r in 0..n_rows {
            let src = order.map(r) * row_bytes;
            data.extend_from_slice(&bytes[src + b0..src + b1]);
            release.touched(src..src + row_bytes);
        }
        self.file.release_pages(&g);
        Ok(Some(QuantRows {
            ty,
            rows: n_rows,
            cols: cols.len(),
            row_bytes: b1 - b0,
            data,
        }))
    }

    fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>, ModelError> {
        super::tokenizer::from_gguf(&self.file)
    }

    fn chat_template(&self) -> Option<String> {
        self.file
            .meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(str::to_string)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

fn meta_usize(f: &GgufFile, key: &str) -> Result<Option<usize>, ModelError> {
    match f.meta(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| ModelError::config(key, format!("{v:?} is not a non-negative integer"))),
    }
}

fn meta_f64(f: &GgufFile, key: &str) -> Result<Option<f64>, ModelError> {
    match f.meta(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::config(key, format!("{v:?} is not a number"))),
    }
}

fn meta_u32(f: &GgufFile, key: &str) -> Result<Option<u32>, ModelError> {
    meta_usize(f, key)?
        .map(|v| u32::try_from(v).map_err(|_| ModelError::config(key, format!("{v} is not a token id"))))
        .transpose()
}

/// Reads the Llama configuration from GGUF metadata (`general.architecture` and the `<arch>.*` keys).
pub fn config_from_gguf(f: &GgufFile) -> Result<LlamaConfig, ModelError> {
    let arch = f
        .meta("general.architecture")
        .ok_or_else(|| ModelError::config("general.architecture", "missing"))?
        .as_str()
        .ok_or_else(|| ModelError::config("general.architecture", "not a string"))?;
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "general.architecture `{arch}` (only `llama`)"
        )));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let req = |s: &str| -> Result<usize, ModelError> {
        meta_usize(f, &k(s))?.ok_or_else(|| ModelError::config(k(s), "missing"))
    };
    let hidden_size = req("embedding_length")?;
    let num_attention_heads = req("attention.head_count")?;
    let num_key_value_heads = meta_usize(f, &k("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    let head_dim = match meta_usize(f, &k("attention.key_length"))? {
        Some(h) => h,
        None => {
            if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                return Err(ModelError::config(
                    k("attention.head_count"),
                    format!("{num_attention_heads} heads do not divide embedding_length {hidden_size}"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if let Some(v) = meta_usize(f, &k("attention.value_length"))? {
        if v != head_dim {
            return Err(ModelError::Unsupported(format!(
                "{} = {v} differs from the key length {head_dim}",
                k("attention.value_length")
            )));
        }
    }
    if let Some(r) = meta_usize(f, &k("rope.dimension_count"))? {
        if r != head_dim {
            return Err(ModelError::Unsupported(format!(
                "{} = {r}: partial rotary embeddings (head_dim {head_dim})",
                k("rope.dimension_count")
            )));
        }
    }
    let vocab_size = match meta_usize(f, &k("vocab_size"))? {
        Some(v) => v,
        None => match f.meta("tokenizer.ggml.tokens").and_then(MetaValue::as_array) {
            Some(t) => t.len(),
            None => f
                .tensor_info("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| ModelError::config(k("vocab_size"), "missing, and no token list or embedding"))?,
        },
    };
    let mut rope_scaling = match f.meta(&k("rope.scaling.type")).map(|v| v.as_str()) {
        None | Some(Some("none")) => None,
        Some(Some("linear")) => {
            let factor = meta_f64(f, &k("rope.scaling.factor"))?
                .ok_or_else(|| ModelError::config(k("rope.scaling.factor"), "missing"))?;
            Some(RopeScaling::Linear { factor })
        }
        Some(Some(other)) => {
            return Err(ModelError::Unsupported(format!("{} `{other}`", k("rope.scaling.type"))));
        }
        Some(None) => return Err(ModelError::config(k("rope.scaling.type"), "not a string")),
    };
    if f.tensor_info("rope_freqs.weight").is_some() {
        if rope_scaling.is_some() {
            return Err(ModelError::Unsupported(
                "both rope.scaling.type and a rope_freqs tensor".into(),
            ));
        }
        let t = f.dequantize("rope_freqs.weight")?;
        rope_scaling = Some(RopeScaling::FreqFactors {
            factors: t.data.iter().map(|&x| x as f64).collect(),
        });
    }
    let mut eos_token_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = meta_u32(f, key)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let cfg = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: req("feed_forward_length")?,
        num_hidden_layers: req("block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: meta_f64(f, &k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: meta_f64(f, &k("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling,
        max_position_embeddings: meta_usize(f, &k("context_length"))?.unwrap_or(2048),
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
        bos_token_id: meta_u32(f, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
    };
    cfg.validate().map_err(|e| match e {
        ModelError::Config { field, msg } => ModelError::config(format!("{arch}.* ({field})"), msg),
        other => other,
    })?;
    Ok(cfg)
}
