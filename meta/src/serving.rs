//! Serving options' defaults, stated once. The coordinator fills a
//! deployment's unset options from these, a worker fills a shard spec's
//! zeros from them, single-process generation runs with the same block size
//! and prompt chunk, and `llmos status` reports the values in force.

/// KV cache blocks on every stage of a deployment.
pub const DEFAULT_KV_BLOCKS: u32 = 1024;
/// Positions per KV block.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// Tokens one step processes: decode tokens plus prompt chunks (a longer
/// prompt is prefilled in chunks of at most this many tokens).
pub const DEFAULT_MAX_BATCH_TOKENS: u32 = 512;
/// Sequences running at once (1 turns batching off).
pub const DEFAULT_MAX_RUNNING: u32 = 64;
/// Requests waiting to start; more are refused with RESOURCE_EXHAUSTED.
pub const DEFAULT_MAX_WAITING: u32 = 256;
/// How hidden states travel between pipeline stages.
pub const DEFAULT_PIPELINE_TRANSPORT: &str = "auto";
