//! Page-aligned byte buffers, without unsafe code: what O_DIRECT needs from the memory it reads into and writes
//! from. The data path assembles incoming write data straight into one of these, so a file-backed device can hand
//! it to the kernel as it is instead of copying it once more.
//!
//! Read buffers are recycled: safe Rust can only hand out initialised memory, and zeroing a fresh 4 MiB buffer for
//! every read the disk is about to overwrite anyway took about an eighth of a rebuild's source-engine CPU. A buffer
//! frozen into `Bytes` goes back to a small per-size pool when the last `Bytes` is dropped.

use std::sync::Mutex;

use bytes::Bytes;

/// Alignment of the buffers made here (enough for O_DIRECT on any device).
pub const ALIGN: usize = 4096;

/// Pooled sizes: powers of two from 4 KiB (2^12) to 4 MiB (2^22, the largest transfer the target takes).
const MIN_SHIFT: usize = 12;
const MAX_SHIFT: usize = 22;
const CLASSES: usize = MAX_SHIFT - MIN_SHIFT + 1;
/// Idle buffers kept per size: this many bytes' worth, and at least `KEEP_MIN` buffers.
const KEEP_BYTES: usize = 4 << 20;
const KEEP_MIN: usize = 4;

static POOL: [Mutex<Vec<Vec<u8>>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

/// The pool class for `len` bytes, if pooled: the smallest power of two that holds it.
fn class_of(len: usize) -> Option<usize> {
    let shift = (len.max(1).next_power_of_two().trailing_zeros() as usize).max(MIN_SHIFT);
    (shift <= MAX_SHIFT).then(|| shift - MIN_SHIFT)
}

fn class_bytes(class: usize) -> usize {
    1 << (class + MIN_SHIFT)
}

fn pool(class: usize) -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    POOL[class].lock().unwrap_or_else(|e| e.into_inner())
}

fn give_back(class: usize, buf: Vec<u8>) {
    let keep = (KEEP_BYTES / class_bytes(class)).max(KEEP_MIN);
    let mut p = pool(class);
    if p.len() < keep {
        p.push(buf);
    }
}

/// Idle buffers in the pool of `len`-byte buffers (for tests).
#[cfg(test)]
fn idle(len: usize) -> usize {
    class_of(len).map_or(0, |c| pool(c).len())
}

/// A buffer of `len` bytes starting at an `ALIGN`-aligned address, to read into. What it holds before it is filled
/// is unspecified (zeroes, or bytes of an earlier buffer): fill all of it before `freeze`.
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    class: Option<usize>,
}

impl AlignedBuf {
    pub fn for_filling(len: usize) -> AlignedBuf {
        let class = class_of(len);
        let recycled = class.and_then(|c| pool(c).pop());
        let buf = recycled.unwrap_or_else(|| vec![0u8; class.map_or(len, class_bytes) + ALIGN]);
        let start = buf.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            buf,
            start,
            len,
            class,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// The filled buffer as `Bytes`, without copying (it still starts aligned). A pooled buffer returns to its
    /// pool when the last `Bytes` that shares it is dropped.
    pub fn freeze(mut self) -> Bytes {
        let range = self.start..self.start + self.len;
        let buf = std::mem::take(&mut self.buf);
        match self.class {
            Some(class) => Bytes::from_owner(Recycled { buf, class }).slice(range),
            None => Bytes::from(buf).slice(range),
        }
    }
}

/// A buffer that was never frozen (its read failed) goes straight back.
impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(class) = self.class.filter(|_| !self.buf.is_empty()) {
            give_back(class, std::mem::take(&mut self.buf));
        }
    }
}

/// Owner of a pooled buffer shared as `Bytes`.
struct Recycled {
    buf: Vec<u8>,
    class: usize,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        give_back(self.class, std::mem::take(&mut self.buf));
    }
}

/// Whether `data` starts at an `ALIGN`-aligned address.
pub fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr().align_offset(ALIGN) == 0
}

/// Concatenates `parts` (`len` bytes in all) into one buffer starting at an `ALIGN`-aligned address. Only the
/// padding in front of it is zeroed; the data is copied once.
pub fn concat<'a>(parts: impl IntoIterator<Item = &'a [u8]>, len: usize) -> Bytes {
    let mut v: Vec<u8> = Vec::with_capacity(len + ALIGN);
    let pad = v.as_ptr().align_offset(ALIGN);
    v.resize(pad, 0);
    for p in parts {
        v.extend_from_slice(p);
    }
    debug_assert_eq!(v.len(), pad + len);
    Bytes::from(v).slice(pad..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_parts_start_aligned_and_keep_their_bytes() {
        let parts: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let len = parts.iter().map(Vec::len).sum();
        let b = concat(parts.iter().map(Vec::as_slice), len);
        assert!(is_aligned(&b));
        assert_eq!(b.len(), len);
        assert_eq!(&b[..], &parts.concat()[..]);
    }

    #[test]
    fn a_filled_buffer_freezes_without_moving() {
        let mut a = AlignedBuf::for_filling(8192);
        a.bytes_mut().fill(0);
        a.bytes_mut()[100] = 7;
        let b = a.freeze();
        assert!(is_aligned(&b));
        assert_eq!((b.len(), b[100], b[101]), (8192, 7, 0));
    }

    // One size per test: tests run in parallel and share the pool.
    #[test]
    fn a_dropped_buffer_is_reused_for_the_next_read_of_its_size() {
        const LEN: usize = 3 << 20; // pooled as 4 MiB
        let mut a = AlignedBuf::for_filling(LEN);
        a.bytes_mut().fill(0xAB);
        let b = a.freeze();
        let addr = b.as_ptr();
        let half = b.slice(LEN / 2..);
        drop(b);
        assert_eq!(idle(LEN), 0, "still shared by a slice");
        drop(half);
        assert_eq!(idle(LEN), 1);
        let mut c = AlignedBuf::for_filling(LEN);
        assert_eq!(
            c.bytes_mut().as_ptr(),
            addr,
            "the same memory, not a new allocation"
        );
        assert_eq!(idle(LEN), 0);
        drop(c);
        assert_eq!(idle(LEN), 1, "an unfrozen buffer goes back too");
    }

    #[test]
    fn the_pool_keeps_only_a_few_idle_buffers_and_not_huge_ones() {
        const LEN: usize = 2 << 20;
        let bufs: Vec<Bytes> = (0..10)
            .map(|_| AlignedBuf::for_filling(LEN).freeze())
            .collect();
        drop(bufs);
        assert_eq!(idle(LEN), KEEP_MIN);
        assert_eq!(class_of(8 << 20), None);
        let big = AlignedBuf::for_filling(8 << 20).freeze();
        assert!(is_aligned(&big));
        assert_eq!(big.len(), 8 << 20);
    }

    #[test]
    fn sizes_map_to_the_smallest_class_that_holds_them() {
        assert_eq!(class_of(512), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(4 << 20), Some(CLASSES - 1));
        assert_eq!(class_of((4 << 20) + 1), None);
    }
}
