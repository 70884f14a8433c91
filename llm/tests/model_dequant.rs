//! Dequantization: known answers from llama.cpp's own Python reference (gguf-py), hand-made blocks whose values
//! can be checked by reading the test, and quantize-then-dequantize properties for the simple formats.

use half::{bf16, f16};
use nccl_llm::model::dequant::{dequantize, GgmlType};
use nccl_llm::model::ModelError;
use proptest::prelude::*;
use serde_json::Value;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize(ty, bytes, &mut out).unwrap();
    out
}

#[test]
fn matches_gguf_py_reference() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dequant_reference.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut seen = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["type"].as_str().unwrap();
        let ty = match name {
            "Q4_0" => GgmlType::Q4_0,
            "Q4_1" => GgmlType::Q4_1,
            "Q5_0" => GgmlType::Q5_0,
            "Q5_1" => GgmlType::Q5_1,
            "Q8_0" => GgmlType::Q8_0,
            "Q2_K" => GgmlType::Q2_K,
            "Q3_K" => GgmlType::Q3_K,
            "Q4_K" => GgmlType::Q4_K,
            "Q5_K" => GgmlType::Q5_K,
            "Q6_K" => GgmlType::Q6_K,
            other => panic!("unexpected type {other} in the fixture"),
        };
        let bytes = hex(case["bytes"].as_str().unwrap());
        let want: Vec<f64> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = deq(ty, &bytes, want.len());
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-6 * w.abs().max(1e-3);
            assert!(
                (g as f64 - w).abs() <= tol,
                "{name} value {i}: got {g}, gguf-py says {w}"
            );
        }
        seen.push(name.to_string());
    }
    assert_eq!(seen.len(), 10, "fixture covers {seen:?}");
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn q8_0_hand_made() {
    let mut b = h(0.5).to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let got = deq(GgmlType::Q8_0, &b, 32);
    let want: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 0.5).collect();
    assert_eq!(got, want);
}

#[test]
fn q4_0_and_q4_1_hand_made() {
    // Byte j holds value j in its low nibble and value j + 16 in its high nibble.
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let mut b = h(2.0).to_vec();
    b.extend(&qs);
    let got = deq(GgmlType::Q4_0, &b, 32);
    for j in 0..16 {
        assert_eq!(got[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(got[j + 16], (15.0 - j as f32 - 8.0) * 2.0);
    }
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend(&qs);
    let got = deq(GgmlType::Q4_1, &b, 32);
    for j in 0..16 {
        assert_eq!(got[j], j as f32 * 0.25 - 1.0);
        assert_eq!(got[j + 16], (15 - j) as f32 * 0.25 - 1.0);
    }
}

#[test]
fn q5_0_hand_made() {
    // qh bit j is the 5th bit of value j; set it for the odd values only.
    let qh: u32 = 0xAAAA_AAAA;
    let mut b = h(1.0).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend([0x21u8; 16]); // low nibble 1, high nibble 2
    let got = deq(GgmlType::Q5_0, &b, 32);
    for (j, &v) in got.iter().enumerate() {
        let low4 = if j < 16 { 1 } else { 2 };
        let q = low4 + if j % 2 == 1 { 16 } else { 0 };
        assert_eq!(v, (q - 16) as f32, "value {j}");
    }
}

#[test]
fn q4_k_hand_made() {
    // d = 1, dmin = 0.5. Sub-blocks 0..4 take scale/min from the low 6 bits of bytes 0..4 / 4..8; sub-blocks 4..8
    // take low nibbles from bytes 8..12 and the two top bits from bytes 0..4 (scale) and 4..8 (min).
    let mut b = h(1.0).to_vec();
    b.extend(h(0.5));
    let mut scales = [0u8; 12];
    // scales 1,2,3,4 and mins 5,6,7,8 for sub-blocks 0..4
    for j in 0..4 {
        scales[j] = (j + 1) as u8;
        scales[j + 4] = (j + 5) as u8;
    }
    // sub-block 4: scale 0b01_0011 = 19 (low nibble 3 in byte 8, top bits 01 in byte 0); min 0b10_0001 = 33
    // (high nibble 1 in byte 8, top bits 10 in byte 4). Sub-blocks 5..8: scale 1, min 0.
    scales[8] = 0x13;
    scales[0] |= 0b01 << 6;
    scales[4] |= 0b10 << 6;
    scales[9..12].fill(0x01);
    b.extend(scales);
    // qs: chunk c (32 bytes) holds sub-block 2c in low nibbles and 2c+1 in high nibbles; use l % 16 and 15 - l % 16
    let qs: Vec<u8> = (0..128)
        .map(|i| ((i % 16) as u8) | ((15 - (i % 16) as u8) << 4))
        .collect();
    b.extend(&qs);
    let got = deq(GgmlType::Q4_K, &b, 256);
    let sc = [1.0, 2.0, 3.0, 4.0, 19.0, 1.0, 1.0, 1.0];
    let mn = [5.0, 6.0, 7.0, 8.0, 33.0, 0.0, 0.0, 0.0];
    for sub in 0..8 {
        for l in 0..32 {
            let q = if sub % 2 == 0 {
                (l % 16) as f32
            } else {
                (15 - l % 16) as f32
            };
            let want = sc[sub] * q - 0.5 * mn[sub];
            assert_eq!(got[sub * 32 + l], want, "sub-block {sub} value {l}");
        }
    }
}

#[test]
fn q6_k_hand_made() {
    // d = 0.5, scales[k] = k + 1 (one per 16 values); every 6-bit quant = 33 (so q - 32 = 1) except where noted.
    // 33 = 0b10_0001: low nibble 1 in ql, high two bits 0b10 in qh.
    let mut b = vec![0x11u8; 128]; // ql: both nibbles 1
    b.extend([0b1010_1010u8; 64]); // qh: 0b10 in each of the four 2-bit fields
    b.extend((1..=16).map(|k: i8| k as u8));
    b.extend(h(0.5));
    let got = deq(GgmlType::Q6_K, &b, 256);
    for (i, &v) in got.iter().enumerate() {
        assert_eq!(v, 0.5 * (i / 16 + 1) as f32, "value {i}");
    }
    // Now a negative scale and quant 0 (q - 32 = -32) for value 0 only: ql[0] low nibble 0, qh[0] bits 0..2 = 0.
    b[0] = 0x10;
    b[128] = 0b1010_1000;
    b[192] = (-3i8) as u8;
    let got = deq(GgmlType::Q6_K, &b, 256);
    assert_eq!(got[0], 0.5 * -3.0 * -32.0);
    assert_eq!(got[1], 0.5 * -3.0);
}

#[test]
fn float_types_exact() {
    let xs = [0.0f32, -1.5, 3.25, 65504.0, 1e-3, -7.0e-5];
    let f32b: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F32, &f32b, xs.len()), xs);
    let f16b: Vec<u8> = xs
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    let want: Vec<f32> = xs.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(deq(GgmlType::F16, &f16b, xs.len()), want);
    let bf: Vec<u8> = xs
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    let want: Vec<f32> = xs.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(deq(GgmlType::BF16, &bf, xs.len()), want);
}

#[test]
fn bad_lengths_and_types_are_errors() {
    let mut out = vec![0f32; 32];
    assert!(matches!(
        dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out),
        Err(ModelError::InvalidInput(_))
    ));
    let mut out31 = vec![0f32; 31];
    assert!(matches!(
        dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out31),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(matches!(
        dequantize(GgmlType::Q8_K, &[0u8; 292], &mut vec![0f32; 256]),
        Err(ModelError::Unsupported(_))
    ));
    assert!(matches!(
        dequantize(GgmlType::from_id(99), &[], &mut []),
        Err(ModelError::Unsupported(_))
    ));
    // dst untouched on error
    assert!(out.iter().all(|&v| v == 0.0));
}

/// Reference-style quantizers written for the test: they return the bytes and the values the bytes encode.
fn quantize_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 127.0).to_f32();
        bytes.extend(h(d));
        for &v in blk {
            let q = if d == 0.0 {
                0
            } else {
                (v / d).round().clamp(-127.0, 127.0) as i8
            };
            bytes.push(q as u8);
            vals.push(q as f32 * d);
        }
    }
    (bytes, vals)
}

fn quantize_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut vals = vec![0f32; x.len()];
    for (b, blk) in x.chunks(32).enumerate() {
        let min = blk.iter().cloned().fold(f32::INFINITY, f32::min);
        let max = blk.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let d = f16::from_f32((max - min) / 15.0).to_f32();
        let m = f16::from_f32(min).to_f32();
        bytes.extend(h(d));
        bytes.extend(h(m));
        let q = |v: f32| {
            if d == 0.0 {
                0u8
            } else {
                ((v - m) / d).round().clamp(0.0, 15.0) as u8
            }
        };
        for j in 0..16 {
            let (lo, hi) = (q(blk[j]), q(blk[j + 16]));
            bytes.push(lo | (hi << 4));
            vals[b * 32 + j] = lo as f32 * d + m;
            vals[b * 32 + j + 16] = hi as f32 * d + m;
        }
    }
    (bytes, vals)
}

fn quantize_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut vals = vec![0f32; x.len()];
    for (b, blk) in x.chunks(32).enumerate() {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / 7.0).to_f32();
        bytes.extend(h(d));
        let q = |v: f32| {
            if d == 0.0 {
                8u8
            } else {
                ((v / d).round() + 8.0).clamp(0.0, 15.0) as u8
            }
        };
        for j in 0..16 {
            let (lo, hi) = (q(blk[j]), q(blk[j + 16]));
            bytes.push(lo | (hi << 4));
            vals[b * 32 + j] = (lo as f32 - 8.0) * d;
            vals[b * 32 + j + 16] = (hi as f32 - 8.0) * d;
        }
    }
    (bytes, vals)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn q8_0_round_trip(x in prop::collection::vec(-100f32..100f32, 32..=96usize).prop_map(|mut v| { v.truncate(v.len() / 32 * 32); v })) {
        let (bytes, vals) = quantize_q8_0(&x);
        let got = deq(GgmlType::Q8_0, &bytes, x.len());
        prop_assert_eq!(&got, &vals);
        for (blk, g) in x.chunks(32).zip(got.chunks(32)) {
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in blk.iter().zip(g) {
                prop_assert!((a - b).abs() <= amax / 127.0 * 0.51 + amax * 1e-3);
            }
        }
    }

    #[test]
    fn q4_round_trips(x in prop::collection::vec(-10f32..10f32, 32..=96usize).prop_map(|mut v| { v.truncate(v.len() / 32 * 32); v })) {
        let (bytes, vals) = quantize_q4_1(&x);
        let got = deq(GgmlType::Q4_1, &bytes, x.len());
        prop_assert_eq!(&got, &vals);
        for (blk, g) in x.chunks(32).zip(got.chunks(32)) {
            let range = blk.iter().cloned().fold(f32::NEG_INFINITY, f32::max) - blk.iter().cloned().fold(f32::INFINITY, f32::min);
            for (a, b) in blk.iter().zip(g) {
                prop_assert!((a - b).abs() <= range / 15.0 * 0.51 + 0.02);
            }
        }
        let (bytes, vals) = quantize_q4_0(&x);
        prop_assert_eq!(deq(GgmlType::Q4_0, &bytes, x.len()), vals);
    }

    #[test]
    fn f16_round_trip(x in prop::collection::vec(-60000f32..60000f32, 1..64usize)) {
        let b: Vec<u8> = x.iter().flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes()).collect();
        let got = deq(GgmlType::F16, &b, x.len());
        for (a, g) in x.iter().zip(&got) {
            prop_assert!((a - g).abs() <= a.abs() * 1e-3 + 1e-3);
        }
    }
}
