//! Measures what the SDK spends on one list answer: a `ServiceView` of 140 instances
//! (IPv4 addresses, cluster `DEFAULT`, no metadata, session leases: what
//! `shoal-bench compare` registers), framed as a node frames a cached query answer
//! (`encode_result` + `append_response_frame`), then decoded the way the SDK's reader
//! does, many times. Prints the median ns per answer of several rounds.
//!
//! Run: `cargo run --release -p shoal-proto --example decode_answer -- [MODE] [ANSWERS]`
//! where MODE is one of
//! - `generic`: `decode::<ServerFrame>` of a frame body (serde), what the SDK did before;
//! - `fast`: `decode_server_frame` of a frame body, what the SDK does now;
//! - `stream`: `read_frame::<ServerFrame>` frame after frame from an in-memory byte
//!   stream (a buffer of its own per frame, then `generic`): the SDK's reader before;
//! - `reader`: `FrameReader::next_server_frame` over the same stream (one buffer, then
//!   `fast`): the SDK's reader now;
//! - `all` (default): each in turn.
//!
//! Under `valgrind --tool=callgrind` give one mode and a small count (`-- generic 1000`)
//! and compare instruction counts.

use std::time::Instant;

use shoal_proto::{
    append_response_frame, decode, decode_server_frame, encode_result, read_frame, FrameReader,
    Response, ServerFrame, DEFAULT_MAX_FRAME_BYTES, LEN_PREFIX_BYTES,
};
use shoal_storage::{Instance, Lease, ServiceKey, ServiceView, SessionId, DEFAULT_CLUSTER};

const INSTANCES: usize = 140;
const ROUNDS: usize = 7;

fn view() -> ServiceView {
    let instances = (0..INSTANCES)
        .map(|i| {
            // 10.x.y.z as `instance_spec` numbers them: service 37 of 100, 140 each.
            let g = 37 * INSTANCES + i;
            Instance {
                ip: format!("10.{}.{}.{}", (g >> 16) & 0xff, (g >> 8) & 0xff, g & 0xff),
                port: 8080,
                cluster: DEFAULT_CLUSTER.to_string(),
                weight: 1.0,
                healthy: true,
                enabled: true,
                metadata: Default::default(),
                // Session leases read Session(0) in answers.
                lease: Lease::Session(SessionId(0)),
                last_beat_ms: 1_795_000_000_000 + g as u64,
                stamp: 5_000 + g as u64,
            }
        })
        .collect();
    ServiceView {
        key: ServiceKey::named("bench-svc-37"),
        revision: 5_177,
        instances,
        protected: false,
    }
}

/// One frame (prefix and body) as the node sends a cached answer to request `id`.
fn answer_frame(id: u64) -> Vec<u8> {
    let result = encode_result(&Ok(Response::View(view()))).unwrap();
    let mut out = Vec::new();
    append_response_frame(&mut out, id, &result, DEFAULT_MAX_FRAME_BYTES).unwrap();
    out
}

fn instances_of(frame: &ServerFrame) -> usize {
    match frame {
        ServerFrame::Response {
            result: Ok(Response::View(v)),
            ..
        } => v.instances.len(),
        _ => 0,
    }
}

fn generic(frame: &[u8], n: usize) -> usize {
    let body = &frame[LEN_PREFIX_BYTES..];
    let mut seen = 0;
    for _ in 0..n {
        let f: ServerFrame = decode(std::hint::black_box(body)).unwrap();
        seen += instances_of(&f);
    }
    seen
}

fn fast(frame: &[u8], n: usize) -> usize {
    let body = &frame[LEN_PREFIX_BYTES..];
    let mut seen = 0;
    for _ in 0..n {
        let f = decode_server_frame(std::hint::black_box(body)).unwrap();
        seen += instances_of(&f);
    }
    seen
}

fn reader(frames: &[u8], n: usize) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rd = FrameReader::new(std::hint::black_box(frames), DEFAULT_MAX_FRAME_BYTES);
        let mut seen = 0;
        for _ in 0..n {
            let f = rd.next_server_frame().await.unwrap().unwrap();
            seen += instances_of(&f);
        }
        seen
    })
}

fn stream(frames: &[u8], n: usize) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rd = std::hint::black_box(frames);
        let mut seen = 0;
        for _ in 0..n {
            let f: ServerFrame = read_frame(&mut rd, DEFAULT_MAX_FRAME_BYTES)
                .await
                .unwrap()
                .unwrap();
            seen += instances_of(&f);
        }
        seen
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "all".into());
    let n: usize = args.next().map_or(20_000, |s| s.parse().expect("ANSWERS"));
    let one = answer_frame(1234);
    // The same answer n times, back to back, as a stream of frames.
    let frames = one.repeat(n);
    println!(
        "answer: {} instances, {} bytes a frame; {n} answers a round, median of {ROUNDS} rounds",
        INSTANCES,
        one.len()
    );
    let run = |name: &str, f: &dyn Fn() -> usize| {
        let mut ns: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                let seen = f();
                let e = t.elapsed();
                assert_eq!(seen, n * INSTANCES);
                e.as_nanos() as f64 / n as f64
            })
            .collect();
        ns.sort_by(f64::total_cmp);
        println!(
            "{name:>8}: {:>8.0} ns per answer (min {:.0}, max {:.0})",
            ns[ROUNDS / 2],
            ns[0],
            ns[ROUNDS - 1]
        );
    };
    let all = mode == "all";
    if all || mode == "generic" {
        run("generic", &|| generic(&one, n));
    }
    if all || mode == "fast" {
        run("fast", &|| fast(&one, n));
    }
    if all || mode == "stream" {
        run("stream", &|| stream(&frames, n));
    }
    if all || mode == "reader" {
        run("reader", &|| reader(&frames, n));
    }
}
