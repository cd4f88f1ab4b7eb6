//! # kiln-tools
//!
//! The tools of the `kiln` binary, kept apart from the runtime (the `kiln` crate's `src/`):
//! they start clusters, storm them and measure them from outside, as any client would.
//!
//! | module         | what                                                                  |
//! |----------------|-----------------------------------------------------------------------|
//! | [`bench`]      | `kiln bench`: no-op jobs against the raw JetStream floor; CPU and NATS messages per job; a slot's duty cycle; `--torchscript` (feature `torch`, on by default: links libtorch) |
//! | [`bench_node`] | what every bench row measures with: options, figures, the no-op job loop, a node child process, CPU per job |
//! | [`bench_tracing`] | `kiln bench`'s tracing rows: the same jobs with OTLP span export on, as ratios to off |
//! | [`bench_http`] | `kiln bench --http`: the gateway against NATS and the object store    |
//! | [`bench_webhooks`] | `kiln bench --webhooks`: a job's end to its webhook's arrival, against a plain POST |
//! | [`http_sink`]  | the benches' minimal HTTP/1.1 receiver (webhooks, OTLP export)         |
//! | [`scale`]      | `kiln scale`: a cluster's costs at 10, 30, 100 simulated nodes        |
//! | [`chaos`]      | `kiln chaos`: a seeded storm of jobs and faults, then the invariants  |
//! | [`in_process`] | what the tools need of the runtime and cannot name: a node started in this process |
//!
//! The `kiln` crate depends on this one and re-exports its modules (`kiln::chaos`,
//! `kiln::bench`, ...), so the `kiln` binary keeps `kiln chaos|bench|scale` and the tests keep
//! their paths. Cargo allows no cycle, so nothing here names the `kiln` crate: the tools talk
//! to a cluster as clients (`kiln-client`), start `kiln node` and `kiln gateway` as processes
//! of the binary that runs them (`std::env::current_exe`), and get an in-process node through
//! [`in_process::NodeStarter`], which the binary passes in.

pub mod bench;
pub mod bench_http;
pub mod bench_node;
pub mod bench_tracing;
pub mod bench_webhooks;
pub mod chaos;
pub mod http_sink;
pub mod in_process;
pub mod scale;
