//! This worker's spare message buffers: a buffer a finished exchange gives
//! back is the next exchange's, instead of a free and a fresh allocation.
//!
//! Each exchange needs a few buffers of about [`READ_CHUNK`] (the client's
//! head, the rewritten request, the backend's response, the answer's
//! head) and two header lists. Allocating and freeing them per request kept the allocator
//! setting up and tearing down whole pages at load. Kept here, per worker
//! (one thread: no lock), are at most [`MAX_SPARE`] of each kind, each of
//! at most [`MAX_KEPT`] bytes, so what is kept is bounded whatever the
//! traffic, and an idle connection still holds none.

use std::cell::RefCell;

use super::{Buf, HeaderRanges, READ_CHUNK};

/// Buffers kept per kind and worker: about the exchanges a worker has in
/// flight at a time under load (at 64 a worker serving 128 busy
/// connections still allocated for many of its exchanges).
const MAX_SPARE: usize = 256;
/// A larger buffer (a long head or a big body went through it) is freed.
const MAX_KEPT: usize = 2 * READ_CHUNK;
/// The least a write buffer is made with, so that one sized for a short
/// head can be kept and serve a longer one next.
const MIN_VEC: usize = READ_CHUNK / 8;
/// A longer header list is freed.
const MAX_KEPT_HEADERS: usize = 64;

thread_local! {
    /// Read buffers (client heads, backend responses).
    static BUFS: RefCell<Vec<Buf>> = const { RefCell::new(Vec::new()) };
    /// Write buffers (rewritten requests, answer heads).
    static VECS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Parsed heads' header lists.
    static RANGES: RefCell<Vec<HeaderRanges>> = const { RefCell::new(Vec::new()) };
}

/// An empty header list with room for `len` headers.
pub(super) fn ranges(len: usize) -> HeaderRanges {
    let mut r = RANGES.with_borrow_mut(Vec::pop).unwrap_or_default();
    r.reserve(len);
    r
}

/// Keeps a header list for a later [`ranges`] if it is of a usual size.
pub(super) fn give_ranges(mut r: HeaderRanges) {
    if (1..=MAX_KEPT_HEADERS).contains(&r.capacity()) {
        r.clear();
        RANGES.with_borrow_mut(|spare| {
            if spare.len() < MAX_SPARE {
                spare.push(r);
            }
        });
    }
}

/// An empty read buffer with room for at least [`READ_CHUNK`] bytes.
pub(super) fn buf() -> Buf {
    BUFS.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Buf::with_capacity(READ_CHUNK))
}

/// Keeps `buf` for a later [`buf`] if it is all this side holds of its
/// memory and of a usual size; else frees it.
pub(super) fn give_buf(mut buf: Buf) {
    buf.clear();
    // Without allocating: false when a split-off part still shares it.
    if buf.try_reclaim(READ_CHUNK) && buf.capacity() <= MAX_KEPT {
        BUFS.with_borrow_mut(|spare| {
            if spare.len() < MAX_SPARE {
                spare.push(buf);
            }
        });
    }
}

/// An empty write buffer with room for at least `len` bytes.
pub(super) fn vec(len: usize) -> Vec<u8> {
    let mut v = VECS.with_borrow_mut(Vec::pop).unwrap_or_default();
    v.reserve(len.max(MIN_VEC));
    v
}

/// Keeps `v` for a later [`vec`] if it is of a usual size; else frees it.
pub(super) fn give_vec(mut v: Vec<u8>) {
    if (MIN_VEC..=MAX_KEPT).contains(&v.capacity()) {
        v.clear();
        VECS.with_borrow_mut(|spare| {
            if spare.len() < MAX_SPARE {
                spare.push(v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_shared_or_large_ones_do_not() {
        let mut b = buf();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let ptr = b.as_ptr();
        give_buf(b);
        let mut b = buf();
        assert_eq!(b.as_ptr(), ptr, "the same memory back");
        assert!(b.is_empty() && b.capacity() >= READ_CHUNK);
        // A part still shared elsewhere: not kept.
        b.extend_from_slice(b"head");
        let head = b.split_to(2).freeze();
        give_buf(b);
        let other = buf();
        assert_ne!(other.as_ptr(), ptr);
        drop(head);
        // Too large to keep.
        give_vec(Vec::with_capacity(MAX_KEPT * 4));
        let small = vec(1);
        assert!(small.capacity() < MAX_KEPT * 4);
        let v = vec(READ_CHUNK);
        let p = v.as_ptr();
        give_vec(v);
        let again = vec(10);
        assert_eq!(again.as_ptr(), p);
        // Header lists too.
        let r = ranges(4);
        let rp = r.as_ptr();
        give_ranges(r);
        let again = ranges(2);
        assert_eq!(again.as_ptr(), rp);
    }
}
