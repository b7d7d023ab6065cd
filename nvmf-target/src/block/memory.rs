//! A thin RAM-backed block device. Memory is held in 1 MiB chunks allocated on first write and freed on deallocate,
//! each behind its own lock so concurrent I/O to different chunks does not contend.

use std::sync::RwLock;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};

use super::{BlockDevice, BlockError, check_range};

const CHUNK: u64 = 1 << 20;

pub struct MemoryDevice {
    block_size: u32,
    num_blocks: u64,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
    flushes: std::sync::atomic::AtomicU64,
}

impl MemoryDevice {
    pub fn new(size_bytes: u64, block_size: u32) -> MemoryDevice {
        let num_blocks = size_bytes / u64::from(block_size);
        let n = (num_blocks * u64::from(block_size)).div_ceil(CHUNK) as usize;
        MemoryDevice {
            block_size,
            num_blocks,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
            flushes: Default::default(),
        }
    }

    /// Flushes asked of it so far (they have nothing to do: memory keeps everything).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes of memory currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| c.read().map(|g| g.is_some()).unwrap_or(false))
            .count() as u64
            * CHUNK
    }

    /// Calls `f(chunk_index, offset_in_chunk, range_in_request)` for each chunk piece of the byte range.
    fn for_each_piece(
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let idx = (pos / CHUNK) as usize;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK - pos % CHUNK).min(len - done);
            f(idx, within, done as usize..(done + n) as usize);
            done += n;
        }
    }

    fn zero_range(&self, offset: u64, len: u64) {
        Self::for_each_piece(offset, len, |idx, within, r| {
            let mut g = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            if r.len() as u64 == CHUNK {
                *g = None;
            } else if let Some(chunk) = g.as_mut() {
                chunk[within..within + r.len()].fill(0);
            }
        });
    }
}

#[async_trait]
impl BlockDevice for MemoryDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        let mut out = BytesMut::with_capacity(len as usize);
        Self::for_each_piece(offset, len, |idx, within, r| {
            let g = self.chunks[idx].read().unwrap_or_else(|e| e.into_inner());
            match g.as_ref() {
                Some(chunk) => out.extend_from_slice(&chunk[within..within + r.len()]),
                None => out.put_bytes(0, r.len()),
            }
        });
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BlockError> {
        check_range(
            offset,
            data.len() as u64,
            self.block_size,
            self.size_bytes(),
        )?;
        Self::for_each_piece(offset, data.len() as u64, |idx, within, r| {
            let mut g = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            let chunk = g.get_or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            chunk[within..within + r.len()].copy_from_slice(&data[r]);
        });
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.block_size, self.size_bytes())?;
        self.zero_range(offset, len);
        Ok(())
    }

    async fn deallocate(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn allocated_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, BlockError> {
        let size = self.size_bytes();
        let mut all: Vec<(u64, u64)> = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            if c.read().map(|g| g.is_some()).unwrap_or(true) {
                let start = i as u64 * CHUNK;
                let n = CHUNK.min(size - start);
                match all.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += n,
                    _ => all.push((start, n)),
                }
            }
        }
        Ok(Some(super::clip_ranges(&all, offset, len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::conformance;

    #[tokio::test]
    async fn conforms() {
        conformance::run(&MemoryDevice::new(4 << 20, 512)).await;
        conformance::run(&MemoryDevice::new(3 << 20, 4096)).await;
    }

    #[tokio::test]
    async fn is_thin_and_frees_on_deallocate() {
        let d = MemoryDevice::new(64 << 20, 4096);
        assert_eq!(d.allocated_bytes(), 0);
        d.write(5 << 20, Bytes::from(vec![1; 4096])).await.unwrap();
        assert_eq!(d.allocated_bytes(), 1 << 20);
        d.deallocate(5 << 20, 1 << 20).await.unwrap();
        assert_eq!(d.allocated_bytes(), 0);
    }
}
