//! Behaviour every [`BlockDevice`] must show, run against each backend by its tests.

use bytes::Bytes;

use super::{BlockDevice, BlockError};

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect::<Vec<u8>>(),
    )
}

pub async fn run(d: &dyn BlockDevice) {
    let bs = u64::from(d.block_size());
    let size = d.size_bytes();
    assert!(size >= 4 * bs);

    // Unwritten space reads as zeroes.
    assert!(d.read(0, bs).await.unwrap().iter().all(|&b| b == 0));

    // Writes read back, also across internal chunk boundaries and at the very end.
    for off in [0, bs, (1 << 20) - bs, size - 2 * bs] {
        let data = pattern(off as u8, 2 * bs as usize);
        d.write(off, data.clone()).await.unwrap();
        assert_eq!(d.read(off, 2 * bs).await.unwrap(), data, "at {off}");
    }

    // Write zeroes and deallocate zero the range and nothing else.
    d.write(0, pattern(9, 3 * bs as usize)).await.unwrap();
    d.write_zeroes(bs, bs).await.unwrap();
    let back = d.read(0, 3 * bs).await.unwrap();
    assert_eq!(
        &back[..bs as usize],
        &pattern(9, 3 * bs as usize)[..bs as usize]
    );
    assert!(back[bs as usize..2 * bs as usize].iter().all(|&b| b == 0));
    assert_eq!(
        &back[2 * bs as usize..],
        &pattern(9, 3 * bs as usize)[2 * bs as usize..]
    );
    d.deallocate(0, bs).await.unwrap();
    assert!(d.read(0, bs).await.unwrap().iter().all(|&b| b == 0));
    d.flush().await.unwrap();

    // Bad ranges are refused.
    assert!(matches!(
        d.read(size, bs).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.read(u64::MAX - bs + 1, bs).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write(1, Bytes::from(vec![0; bs as usize])).await,
        Err(BlockError::Unaligned { .. })
    ));
    assert!(matches!(
        d.write_zeroes(size - bs, 2 * bs).await,
        Err(BlockError::OutOfRange { .. })
    ));
}
