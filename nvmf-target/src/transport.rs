//! Socket plumbing shared by the target and the initiator: writing a list of PDU segments with vectored writes.

use std::io::IoSlice;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;

/// Most segments handed to one writev.
const MAX_IOV: usize = 64;

/// Writes every segment in order with as few system calls as the socket allows, then clears the list.
pub async fn write_parts<W: AsyncWriteExt + Unpin>(
    wr: &mut W,
    parts: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    parts.retain(|p| !p.is_empty());
    let mut idx = 0;
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[idx..]
            .iter()
            .take(MAX_IOV)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = parts[idx].len();
            if n >= len {
                n -= len;
                idx += 1;
            } else {
                parts[idx].advance(n);
                n = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_everything_in_order() {
        let mut out: Vec<u8> = Vec::new();
        let mut parts: Vec<Bytes> = (0..200u8)
            .map(|i| Bytes::from(vec![i; usize::from(i % 7)]))
            .collect();
        let want: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        write_parts(&mut out, &mut parts).await.unwrap();
        assert_eq!(out, want);
        assert!(parts.is_empty());
    }
}
