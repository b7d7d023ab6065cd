//! Writes the seed corpus: `record-seeds OUT_DIR` records real exchanges between Keelson's initiator and target
//! into OUT_DIR/target_connection and OUT_DIR/pdu_decoder.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: record-seeds OUT_DIR"))?;
    let n = nvmf_fuzz_harness::record::record(std::path::Path::new(&out)).await?;
    println!("recorded {n} seeds into {out}");
    Ok(())
}
