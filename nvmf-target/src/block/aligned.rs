//! Page-aligned byte buffers, without unsafe code: what O_DIRECT needs from the memory it reads into and writes
//! from. The data path assembles incoming write data straight into one of these, so a file-backed device can hand
//! it to the kernel as it is instead of copying it once more.

use bytes::Bytes;

/// Alignment of the buffers made here (enough for O_DIRECT on any device).
pub const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes starting at an `ALIGN`-aligned address, to read into.
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        AlignedBuf { buf, start, len }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// The filled buffer as `Bytes`, without copying (it still starts aligned).
    pub fn freeze(self) -> Bytes {
        Bytes::from(self.buf).slice(self.start..self.start + self.len)
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
        let mut a = AlignedBuf::zeroed(8192);
        a.bytes_mut()[100] = 7;
        let b = a.freeze();
        assert!(is_aligned(&b));
        assert_eq!((b.len(), b[100], b[101]), (8192, 7, 0));
    }
}
