//! Bulk copies for the direct path: plain `memcpy`, or non-temporal (streaming) stores for large outputs
//! that nobody reads soon, which saves the read-for-ownership of every destination line (a third of the
//! memory traffic of a copy) and keeps the inputs in cache.

/// Outputs of at least this many bytes (per call, all ranks' outputs together) are written with streaming
/// stores: beyond the last-level cache they would be evicted before anyone reads them anyway.
pub(crate) const STREAM_MIN_BYTES: usize = 16 << 20;

/// Copies `len` elements from `src` to `dst`, streaming when `stream`.
///
/// # Safety
/// As `ptr::copy_nonoverlapping`: `src` valid for reads and `dst` for writes of `len` elements, not
/// overlapping, and no concurrent access to `dst`. After streaming, call [`fence`] before publishing.
#[inline]
pub(crate) unsafe fn copy_out<T>(dst: *mut T, src: *const T, len: usize, stream: bool) {
    let bytes = len * std::mem::size_of::<T>();
    #[cfg(target_arch = "x86_64")]
    if stream && bytes >= 256 {
        // SAFETY: forwarded from the caller's contract, in bytes.
        unsafe { stream_bytes(dst.cast(), src.cast(), bytes) };
        return;
    }
    let _ = stream;
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src.cast::<u8>(), dst.cast::<u8>(), bytes) };
}

#[cfg(target_arch = "x86_64")]
unsafe fn stream_bytes(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let head = ((16 - (dst as usize & 15)) & 15).min(len);
    // SAFETY: all offsets stay below `len`, inside both buffers (caller's contract); `_mm_stream_si128` gets
    // 16-byte aligned destinations (after the head) and SSE2 is part of the x86_64 baseline.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let (mut d, mut s, mut n) = (dst.add(head), src.add(head), len - head);
        while n >= 64 {
            let a = _mm_loadu_si128(s as *const __m128i);
            let b = _mm_loadu_si128(s.add(16) as *const __m128i);
            let c = _mm_loadu_si128(s.add(32) as *const __m128i);
            let e = _mm_loadu_si128(s.add(48) as *const __m128i);
            _mm_stream_si128(d as *mut __m128i, a);
            _mm_stream_si128(d.add(16) as *mut __m128i, b);
            _mm_stream_si128(d.add(32) as *mut __m128i, c);
            _mm_stream_si128(d.add(48) as *mut __m128i, e);
            d = d.add(64);
            s = s.add(64);
            n -= 64;
        }
        std::ptr::copy_nonoverlapping(s, d, n);
    }
}

/// Orders earlier streaming stores before later stores (the barrier that publishes them).
#[inline]
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions (SSE, part of the x86_64 baseline).
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}
