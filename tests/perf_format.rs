//! Golden-format tests: the table must match nccl-tests' printf formats character for character.
//!
//! The expected strings were produced by applying nccl-tests' format strings (src/util.cu) with a C-compatible
//! printf (Python's `%` operator) to the same values, not by running nccl-perf.

use nccl_stack::perf::format;

#[test]
fn row_preamble_matches_printf() {
    // "%12li  %12li  %8s  %6s  %6s" with the root pre-formatted as "%6i"
    assert_eq!(
        format::row_preamble(1048576, 262144, "float", "sum", -1),
        "     1048576        262144     float     sum      -1"
    );
    assert_eq!(
        format::row_preamble(0, 0, "bfloat16", "none", 3),
        "           0             0  bfloat16    none       3"
    );
}

#[test]
fn row_body_matches_printf() {
    // "  %7s  %6s  %6s  %6g" after getFloatStr(…, 7) / getFloatStr(…, 6)
    assert_eq!(
        format::row_body(12.34, 0.08, 0.08, Some(0)),
        "    12.34    0.08    0.08       0"
    );
    assert_eq!(
        format::row_body(1234567.0, 123456.7, 1234.56, Some(1234567)),
        "  1234567  123457  1234.6  1.23457e+06"
    );
    // -c 0: "  %7s  %6s  %6s    N/A"
    assert_eq!(
        format::row_body(5.0, 0.001, 0.0, None),
        "     5.00    0.00    0.00    N/A"
    );
    // Ops without an in-place form.
    assert_eq!(format::row_body_not_applicable(), "      N/A     N/A     N/A     N/A");
    // Columns keep their widths: a full row is preamble + 2 bodies.
    let row = format::row_preamble(8, 2, "float", "sum", -1) + &format::row_body(1.0, 0.0, 0.0, Some(0)).repeat(2);
    assert_eq!(row.len(), 52 + 2 * 33);
}

#[test]
fn header_matches_printf() {
    let h = format::result_header(false);
    let lines: Vec<&str> = h.split_inclusive('\n').collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0], "#\n");
    assert_eq!(
        lines[1],
        "#                                                              out-of-place                       in-place          \n"
    );
    assert_eq!(
        lines[2],
        "#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong \n"
    );
    assert_eq!(
        lines[3],
        "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)         \n"
    );
    // -C 1 renames the time columns.
    assert!(format::result_header(true).contains("  cputime  "));
}

#[test]
fn footer_matches_printf() {
    let f = format::footer(0, 1.23456789, "all_reduce_perf");
    assert!(f.starts_with("# Out of bounds values : 0 OK\n# Avg bus bandwidth    : 1.23457 \n#\n"));
    assert!(f.contains("# Collective test concluded: all_reduce_perf\n"));
    let bad = format::footer(3, 0.0, "x");
    assert!(bad.starts_with("# Out of bounds values : 3 FAILED\n# Avg bus bandwidth    : 0 \n"));
}

#[test]
fn device_line_matches_printf() {
    // "#  Rank %2d Group %2d Pid %6d on %10s device %2d [%04x:%02x:%02x] %s\n"
    assert_eq!(
        format::device_line(1, 4242, "myhost", 1, (0, 0x1b, 0), "NVIDIA H100"),
        "#  Rank  1 Group  0 Pid   4242 on     myhost device  1 [0000:1b:00] NVIDIA H100\n"
    );
}

#[test]
fn config_line_matches_write_device_report() {
    assert_eq!(
        format::config_line(1, 2, 8, 67108864, 2, 1048576, 1, 20, 1, 1, 0),
        "# nThread 1 nGpus 2 minBytes 8 maxBytes 67108864 step: 2(factor) warmup iters: 1 iters: 20 agg iters: 1 \
         validation: 1 graph: 0 unalign: 0\n"
    );
    assert!(format::config_line(1, 1, 8, 64, 1, 8, 1, 20, 1, 1, 0).contains(" step: 8(bytes) "));
}

#[test]
fn float_str_like_get_float_str() {
    // snprintf("%7.2f"), then "%7.1f", "%7.0f", then "%7.1e"
    assert_eq!(format::float_str(2.34567, 7), "   2.35");
    assert_eq!(format::float_str(0.08, 6), "  0.08");
    assert_eq!(format::float_str(12345678.0, 7), "1.2e+07");
}
