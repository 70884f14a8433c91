//! GGML tensor element types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (all multi-byte fields little-endian, f16 scales):
//!
//! | type | values/block | bytes | layout |
//! | --- | --- | --- | --- |
//! | Q4_0 | 32 | 18 | `d: f16, qs: [u8; 16]`; value `j` is low nibble of `qs[j]`, value `j+16` the high nibble; `(q - 8) * d` |
//! | Q4_1 | 32 | 20 | `d: f16, m: f16, qs: [u8; 16]`; `q * d + m` |
//! | Q5_0 | 32 | 22 | `d: f16, qh: u32, qs: [u8; 16]`; 5th bit of value `j` is bit `j` of `qh`; `(q - 16) * d` |
//! | Q5_1 | 32 | 24 | `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `q * d + m` |
//! | Q8_0 | 32 | 34 | `d: f16, qs: [i8; 32]`; `q * d` |
//! | Q2_K | 256 | 84 | `scales: [u8; 16]` (low nibble scale, high nibble min), `qs: [u8; 64], d, dmin: f16` |
//! | Q3_K | 256 | 110 | `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12]` (16 six-bit scales), `d: f16` |
//! | Q4_K | 256 | 144 | `d, dmin: f16, scales: [u8; 12]` (8 six-bit scale/min pairs), `qs: [u8; 128]` |
//! | Q5_K | 256 | 176 | `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` |
//! | Q6_K | 256 | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` |

use half::{bf16, f16};

use super::ModelError;

/// A GGML element type, with its GGUF type id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half (id 1).
    F16,
    /// 4-bit, one scale per 32 (id 2).
    Q4_0,
    /// 4-bit, scale and minimum per 32 (id 3).
    Q4_1,
    /// 5-bit, one scale per 32 (id 6).
    Q5_0,
    /// 5-bit, scale and minimum per 32 (id 7).
    Q5_1,
    /// 8-bit, one scale per 32 (id 8).
    Q8_0,
    /// 8-bit with sum, per 32 (id 9; not dequantized).
    Q8_1,
    /// 2-bit k-quant, super-blocks of 256 (id 10).
    Q2_K,
    /// 3-bit k-quant, super-blocks of 256 (id 11).
    Q3_K,
    /// 4-bit k-quant, super-blocks of 256 (id 12).
    Q4_K,
    /// 5-bit k-quant, super-blocks of 256 (id 13).
    Q5_K,
    /// 6-bit k-quant, super-blocks of 256 (id 14).
    Q6_K,
    /// 8-bit k-quant (id 15; not dequantized).
    Q8_K,
    /// 8-bit integer (id 24; not dequantized).
    I8,
    /// 16-bit integer (id 25; not dequantized).
    I16,
    /// 32-bit integer (id 26; not dequantized).
    I32,
    /// 64-bit integer (id 27; not dequantized).
    I64,
    /// 64-bit float (id 28).
    F64,
    /// bfloat16 (id 30).
    BF16,
    /// A type id this crate does not know the layout of.
    Unknown(u32),
}

impl GgmlType {
    /// The type with GGUF id `id`.
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Unknown(other),
        }
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Unknown(id) => id,
        }
    }

    /// `(values per block, bytes per block)`, or `None` for an unknown layout.
    pub fn block(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            F64 | I64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            Unknown(_) => return None,
        })
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | F64 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K
        )
    }

    /// Bytes taken by `n` consecutive values, or `None` if `n` is not a whole number of blocks, the layout is
    /// unknown, or the size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (bs, bb) = self.block()?;
        if n % bs != 0 {
            return None;
        }
        (n / bs).checked_mul(bb)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "ggml type {id}"),
            other => write!(f, "{other:?}"),
        }
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes `dst.len()` values of type `ty` from `src` into `dst`.
///
/// `src` must hold exactly [`GgmlType::bytes_for`]`(dst.len())` bytes; otherwise, or for a type that cannot be
/// dequantized, an [`ModelError::InvalidInput`] / [`ModelError::Unsupported`] is returned and `dst` is untouched.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), ModelError> {
    if !ty.can_dequantize() {
        return Err(ModelError::Unsupported(format!("dequantizing {ty}")));
    }
    let need = ty.bytes_for(dst.len()).ok_or_else(|| {
        ModelError::InvalidInput(format!("{} values are not a whole number of {ty} blocks", dst.len()))
    })?;
    if src.len() != need {
        return Err(ModelError::InvalidInput(format!(
            "{} {ty} values need {need} bytes, got {}",
            dst.len(),
            src.len()
        )));
    }
    use GgmlType::*;
    match ty {
        F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        F64 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32;
            }
        }
        F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Q8_0 => {
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (o, &q) in y.iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
        }
        Q4_0 => {
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        Q4_1 => {
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..20].iter().enumerate() {
                    y[j] = (q & 0x0F) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        Q5_0 | Q5_1 => {
            let bb = if ty == Q5_0 { 22 } else { 24 };
            for (y, b) in dst.chunks_exact_mut(32).zip(src.chunks_exact(bb)) {
                let d = f16_at(b, 0);
                let (m, rest) = if ty == Q5_0 {
                    (0.0, &b[2..])
                } else {
                    (f16_at(b, 2), &b[4..])
                };
                let bias = if ty == Q5_0 { 16 } else { 0 };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                for (j, &q) in rest[4..20].iter().enumerate() {
                    let lo = ((q & 0x0F) as u32 | (((qh >> j) & 1) << 4)) as i32 - bias;
                    let hi = ((q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i32 - bias;
                    y[j] = lo as f32 * d + m;
                    y[j + 16] = hi as f32 * d + m;
                }
            }
        }
        Q2_K => {
            for (y, b) in dst.chunks_exact_mut(256).zip(src.chunks_exact(84)) {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let mut is = 0;
                let mut out = y.iter_mut();
                for half in 0..2 {
                    let q = &qs[32 * half..32 * half + 32];
                    for shift in [0, 2, 4, 6] {
                        for part in 0..2 {
                            let sc = scales[is];
                            is += 1;
                            let (dl, ml) = (d * (sc & 0x0F) as f32, dmin * (sc >> 4) as f32);
                            for &ql in &q[16 * part..16 * part + 16] {
                                if let Some(o) = out.next() {
                                    *o = dl * ((ql >> shift) & 3) as f32 - ml;
                                }
                            }
                        }
                    }
                }
            }
        }
        Q3_K => {
            for (y, b) in dst.chunks_exact_mut(256).zip(src.chunks_exact(110)) {
                let (hmask, qs, raw) = (&b[0..32], &b[32..96], &b[96..108]);
                let d = f16_at(b, 108);
                // 16 six-bit scales: low nibbles from bytes 0..8, top two bits from bytes 8..12.
                let mut scales = [0i32; 16];
                for (j, s) in scales.iter_mut().enumerate() {
                    let low = if j < 8 { raw[j] & 0x0F } else { raw[j - 8] >> 4 };
                    let high = (raw[8 + j % 4] >> (2 * (j / 4))) & 3;
                    *s = (low | (high << 4)) as i32 - 32;
                }
                let mut is = 0;
                let mut m = 1u8;
                let mut out = y.iter_mut();
                for half in 0..2 {
                    let q = &qs[32 * half..32 * half + 32];
                    for shift in [0, 2, 4, 6] {
                        for part in 0..2 {
                            let dl = d * scales[is] as f32;
                            is += 1;
                            for l in 16 * part..16 * part + 16 {
                                let v = ((q[l] >> shift) & 3) as i32 - if hmask[l] & m != 0 { 0 } else { 4 };
                                if let Some(o) = out.next() {
                                    *o = dl * v as f32;
                                }
                            }
                        }
                        m <<= 1;
                    }
                }
            }
        }
        Q4_K => {
            for (y, b) in dst.chunks_exact_mut(256).zip(src.chunks_exact(144)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales: &[u8; 12] = b[4..16].try_into().expect("12 bytes");
                let qs = &b[16..144];
                for chunk in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * chunk..32 * chunk + 32];
                    let out = &mut y[64 * chunk..64 * chunk + 64];
                    for l in 0..32 {
                        out[l] = d1 * (q[l] & 0x0F) as f32 - mm1;
                        out[l + 32] = d2 * (q[l] >> 4) as f32 - mm2;
                    }
                }
            }
        }
        Q5_K => {
            for (y, b) in dst.chunks_exact_mut(256).zip(src.chunks_exact(176)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales: &[u8; 12] = b[4..16].try_into().expect("12 bytes");
                let qh = &b[16..48];
                let qs = &b[48..176];
                for chunk in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                    let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                    let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * chunk..32 * chunk + 32];
                    let out = &mut y[64 * chunk..64 * chunk + 64];
                    for l in 0..32 {
                        let h1 = ((qh[l] >> (2 * chunk)) & 1) << 4;
                        let h2 = ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
                        out[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - mm1;
                        out[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - mm2;
                    }
                }
            }
        }
        Q6_K => {
            for (y, b) in dst.chunks_exact_mut(256).zip(src.chunks_exact(210)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let out = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        out[l] = d * (sc[is] as i8 as f32) * q1 as f32;
                        out[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
                        out[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
                        out[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
                    }
                }
            }
        }
        _ => unreachable!("checked by can_dequantize"),
    }
    Ok(())
}

/// The `j`-th (0..8) six-bit scale and minimum of a Q4_K/Q5_K super-block: the first four pairs are the low six
/// bits of bytes `j` and `j + 4`; the last four take their low nibbles from bytes 8..12 and their top two bits
/// from the spare bits of bytes `j - 4` (scale) and `j` (min).
#[inline]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
