//! Ring tests: every rank is a thread on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use lockstep_common::auth::{RingRole, RunToken};

use super::handshake::{Hello, handshake, verdict};
use super::*;
use crate::error::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(500);

fn listeners(n: u32) -> (Vec<RingListener>, Vec<String>) {
    let ls: Vec<_> = (0..n).map(|_| RingListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers = ls.iter().map(|l| l.local_addr().to_string()).collect();
    (ls, peers)
}

/// The run token every test ring shares.
fn token() -> RunToken {
    RunToken::parse("ring-tests-token-0123456789", "test").unwrap()
}

fn config(rank: u32, peers: &[String], timeout: Duration, session: &str) -> RingConfig {
    RingConfig {
        rank,
        world_size: peers.len() as u32,
        peers: peers.to_vec(),
        timeout,
        session: session.into(),
        token: token(),
        cancel: None,
    }
}

/// Connects rank `rank` of a ring of two and sums 5 consecutive integers.
fn sum_five(listener: &RingListener, rank: u32, peers: &[String]) -> Vec<f32> {
    let mut ring = Ring::connect(listener, config(rank, peers, TIMEOUT, "test/gen-1")).unwrap();
    let mut buf = consecutive(5, rank);
    ring.all_reduce_sum(&mut buf).unwrap();
    buf
}

/// Runs `f` on every rank of a freshly connected ring of `n` and returns the results by rank.
fn with_ring<T: Send>(n: u32, f: impl Fn(Ring) -> T + Sync) -> Vec<T> {
    let (ls, peers) = listeners(n);
    thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let (f, peers) = (&f, &peers);
                s.spawn(move || f(Ring::connect(l, config(r as u32, peers, TIMEOUT, "test/gen-1")).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn consecutive(len: usize, rank: u32) -> Vec<f32> {
    (0..len).map(|i| (i + rank as usize) as f32).collect()
}

fn exact_sum(len: usize, n: u32) -> Vec<f32> {
    let n = n as usize;
    (0..len).map(|i| (n * i + n * (n - 1) / 2) as f32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn chunks_cover_the_buffer_and_differ_by_at_most_one() {
    for (len, n) in [(0, 3), (1, 4), (3, 4), (10, 3), (1_000_003, 4)] {
        let ranges: Vec<_> = (0..n).map(|i| chunk_range(len, n, i)).collect();
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges[n - 1].end, len);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        let sizes: Vec<_> = ranges.iter().map(|r| r.len()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }
}

#[test]
fn local_is_a_no_op() {
    let mut buf = vec![1.5, -2.0];
    let mut local: Box<dyn Collective> = Box::new(Local);
    local.all_reduce_sum(&mut buf).unwrap();
    assert_eq!((local.rank(), local.world_size(), buf), (0, 1, vec![1.5, -2.0]));
}

#[test]
fn ring_sums_consecutive_integers_exactly_for_1_to_4_ranks() {
    for n in 1..=4 {
        let results = with_ring(n, |mut ring| {
            let rank = ring.rank();
            [0, 1, 3, 1000, 1_000_003]
                .into_iter()
                .map(|len| {
                    let mut buf = consecutive(len, rank);
                    ring.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for (rank, bufs) in results.iter().enumerate() {
            for buf in bufs {
                assert!(
                    buf == &exact_sum(buf.len(), n),
                    "world {n} rank {rank} len {}",
                    buf.len()
                );
            }
        }
    }
}

#[test]
fn ring_ranks_are_bitwise_identical_with_random_floats() {
    for n in 2..=4 {
        let results = with_ring(n, |mut ring| {
            let mut rng = ChaCha8Rng::seed_from_u64(u64::from(ring.rank()) + 7);
            [3, 1000, 100_003]
                .into_iter()
                .map(|len| {
                    let original: Vec<f32> = (0..len).map(|_| rng.random_range(-1e3f32..1e3)).collect();
                    let mut buf = original.clone();
                    ring.all_reduce_sum(&mut buf).unwrap();
                    (original, buf)
                })
                .collect::<Vec<_>>()
        });
        for case in 0..3 {
            let reference = bits(&results[0][case].1);
            for (rank, r) in results.iter().enumerate() {
                assert_eq!(bits(&r[case].1), reference, "world {n} rank {rank} case {case}");
            }
            let sum = &results[0][case].1;
            for (i, got) in sum.iter().enumerate() {
                let want: f64 = results.iter().map(|r| f64::from(r[case].0[i])).sum();
                assert!(
                    (f64::from(*got) - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "element {i}"
                );
            }
        }
    }
}

#[test]
fn ring_survives_many_consecutive_all_reduces() {
    let results = with_ring(3, |ring| {
        // Through the trait object, as the training loop holds it.
        let mut ring: Box<dyn Collective> = Box::new(ring);
        let rank = ring.rank();
        (0..300).all(|i| {
            let len = (i * 37) % 501;
            let mut buf = consecutive(len, rank);
            ring.all_reduce_sum(&mut buf).unwrap();
            buf == exact_sum(len, 3)
        })
    });
    assert_eq!(results, vec![true; 3]);
}

#[test]
fn ring_connect_fails_at_the_deadline_when_the_peer_never_shows_up() {
    let (ls, mut peers) = listeners(2);
    // A port that was just free: nothing listens there.
    peers[1] = {
        let gone = RingListener::bind("127.0.0.1:0").unwrap();
        gone.local_addr().to_string()
    };
    let err = Ring::connect(&ls[0], config(0, &peers, SHORT, "test/gen-1")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Ring { .. }), "{text}");
    assert!(text.contains(&peers[1]) && text.contains("rank 1"), "{text}");
}

#[test]
fn ring_all_reduce_fails_when_a_peer_dies() {
    let results = with_ring(3, |mut ring| {
        let mut buf = consecutive(10_000, ring.rank());
        ring.all_reduce_sum(&mut buf).unwrap();
        if ring.rank() == 2 {
            drop(ring);
            return None;
        }
        Some(ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string()))
    });
    let errors: Vec<String> = results[..2].iter().map(|r| r.clone().unwrap().unwrap_err()).collect();
    // Whichever survivor fails first names the dead rank; the other may only see that survivor
    // hang up. Either way neither hangs.
    assert!(
        errors.iter().any(|e| e.contains("rank 2 at") && e.contains("closed")),
        "{errors:?}"
    );
}

#[test]
fn ring_reports_ranks_that_disagree_on_the_buffer_length() {
    let done = Barrier::new(2);
    let errors = with_ring(2, |mut ring| {
        let mut buf = vec![1.0; 10 + ring.rank() as usize];
        let err = ring.all_reduce_sum(&mut buf).unwrap_err().to_string();
        // Neither ring closes before both have failed.
        done.wait();
        err
    });
    // The first rank to see the mismatch hangs up, so its peer may only see the hang-up.
    assert!(
        errors
            .iter()
            .any(|e| e.contains("gradient layout") && e.contains("all-reduce #1")),
        "{errors:?}"
    );
}

#[test]
fn ring_refuses_a_mismatched_session() {
    let (ls, peers) = listeners(2);
    let errors: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let cfg = config(r as u32, &peers, SHORT, if r == 0 { "run/gen-3" } else { "run/gen-2" });
                s.spawn(move || Ring::connect(l, cfg).unwrap_err().to_string())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errors {
        assert!(
            e.contains("session mismatch") && e.contains("run/gen-2") && e.contains("run/gen-3"),
            "{e}"
        );
    }
}

#[test]
fn ring_skips_a_stale_connection_and_still_connects() {
    let (ls, peers) = listeners(2);
    // Queued before the ring starts, so rank 0 accepts it before its real predecessor.
    let mut stale = TcpStream::connect(&peers[0]).unwrap();
    let hello = Hello {
        rank: 1,
        world_size: 2,
        session: "test/gen-0",
    };
    stale.write_all(&hello.encode(&[0u8; 32])).unwrap();
    // Its own verdict: it would accept.
    stale.write_all(&verdict(None)).unwrap();
    stale.set_read_timeout(Some(TIMEOUT)).unwrap();
    let sums = thread::scope(|s| {
        let rank0 = s.spawn(|| sum_five(&ls[0], 0, &peers));
        // Rank 0 refuses the stale connection and hangs up before rank 1 even starts.
        let mut reply = Vec::new();
        let _ = stale.read_to_end(&mut reply);
        assert!(String::from_utf8_lossy(&reply).contains("session mismatch"));
        let rank1 = s.spawn(|| sum_five(&ls[1], 1, &peers));
        [rank0.join().unwrap(), rank1.join().unwrap()]
    });
    assert_eq!(sums, [exact_sum(5, 2), exact_sum(5, 2)]);
}

#[test]
fn ring_refuses_a_peer_without_the_run_token() {
    let (ls, peers) = listeners(2);
    let errors: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let mut cfg = config(r as u32, &peers, SHORT, "test/gen-1");
                if r == 1 {
                    cfg.token = RunToken::generate();
                }
                s.spawn(move || Ring::connect(l, cfg).unwrap_err().to_string())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errors {
        assert!(e.contains("does not have this run's token"), "{e}");
    }
    // Whoever checked the proof names the peer's address.
    assert!(
        errors
            .iter()
            .any(|e| e.contains("ring peer 127.0.0.1:") && e.contains("failed authentication")),
        "{errors:?}"
    );
}

/// A stranger that knows the session and claims the right rank, but not the token: it sends its hello, reads rank
/// 0's hello and proof, and answers with a guessed proof. Returns what rank 0 says next.
fn guess_the_proof(stream: &mut TcpStream, session: &str) -> String {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hello = Hello {
        rank: 1,
        world_size: 2,
        session,
    };
    stream.write_all(&hello.encode(&[7u8; 32])).unwrap();
    let mut theirs = vec![0u8; 8 + 16 + session.len() + 32];
    stream.read_exact(&mut theirs).unwrap();
    let mut accepted_and_proof = [0u8; 4 + 32];
    stream.read_exact(&mut accepted_and_proof).unwrap();
    assert_eq!(accepted_and_proof[..4], [0u8; 4], "rank 0 should accept the identity");
    stream.write_all(&verdict(None)).unwrap();
    stream.write_all(&[0u8; 32]).unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut reason = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut reason).unwrap();
    String::from_utf8_lossy(&reason).into_owned()
}

#[test]
fn strays_without_the_token_do_not_keep_the_real_neighbour_out() {
    let (ls, peers) = listeners(2);
    // Queued before the ring starts: one connection that never says a word, then one that guesses the proof.
    let mut silent = TcpStream::connect(&peers[0]).unwrap();
    let mut guesser = TcpStream::connect(&peers[0]).unwrap();
    let sums = thread::scope(|s| {
        let rank0 = s.spawn(|| sum_five(&ls[0], 0, &peers));
        // Rank 0 refuses the guesser while the silent one still holds its first connection.
        let refusal = guess_the_proof(&mut guesser, "test/gen-1");
        assert!(
            refusal.contains("failed authentication") && refusal.contains("does not have this run's token"),
            "{refusal}"
        );
        let rank1 = s.spawn(|| sum_five(&ls[1], 1, &peers));
        [rank0.join().unwrap(), rank1.join().unwrap()]
    });
    assert_eq!(sums, [exact_sum(5, 2), exact_sum(5, 2)]);
    // Once the ring had its neighbour, rank 0 hung up on the silent connection (it sent nothing but its hello).
    silent.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut heard = Vec::new();
    silent.read_to_end(&mut heard).unwrap();
    assert!(heard.starts_with(b"LKSTRING"), "{heard:02x?}");
}

#[test]
fn ring_rejects_an_inconsistent_config() {
    let (ls, peers) = listeners(2);
    let with = |edit: fn(&mut RingConfig)| {
        let mut c = config(0, &peers, SHORT, "s");
        edit(&mut c);
        c
    };
    let bad = [
        with(|c| c.rank = 2),
        with(|c| c.world_size = 3),
        with(|c| c.world_size = 0),
        with(|c| c.timeout = Duration::ZERO),
        with(|c| c.session = "x".repeat(5000)),
    ];
    for cfg in bad {
        let result = Ring::connect(&ls[0], cfg.clone());
        assert!(matches!(result, Err(Error::RingConfig(_))), "{cfg:?}");
    }
}

#[test]
fn abort_handle_interrupts_a_blocked_all_reduce() {
    fn shareable<T: Clone + Send + Sync>() {}
    shareable::<AbortHandle>();
    let (ls, peers) = listeners(2);
    let (tx, rx) = mpsc::channel();
    let (result, after): (Result<()>, Result<()>) = thread::scope(|s| {
        let (peers, l1) = (&peers, &ls[1]);
        s.spawn(move || {
            let peer = Ring::connect(l1, config(1, peers, TIMEOUT, "test/gen-1")).unwrap();
            let handle: AbortHandle = rx.recv().unwrap();
            // Rank 0's first frame has arrived, so its all-reduce is under way; never answer it.
            peer.wait_for_prev().unwrap();
            handle.abort();
        });
        let mut ring = Ring::connect(&ls[0], config(0, peers, TIMEOUT, "test/gen-1")).unwrap();
        tx.send(ring.abort_handle()).unwrap();
        let mut buf = vec![1.0; 4 << 20];
        let result = ring.all_reduce_sum(&mut buf);
        (result, ring.all_reduce_sum(&mut buf))
    });
    assert!(matches!(result, Err(Error::Aborted(_))), "{result:?}");
    assert!(matches!(after, Err(Error::Aborted(_))), "{after:?}");
}

#[test]
#[ignore = "measurement: cargo test -p lockstep-worker --release -- --ignored bench --nocapture"]
fn bench_ring_allreduce() {
    for ranks in [2, 4] {
        for mib in [1, 16, 64] {
            let b = bench_allreduce(ranks, mib << 20, 5).unwrap();
            println!(
                "ranks {ranks}  {mib:>3} MiB  {:>9.3} ms/op  bus {:.2} GB/s",
                b.secs_per_op * 1e3,
                b.bus_gbps
            );
        }
    }
}

#[test]
fn bench_checks_results_for_small_rings() {
    let b = bench_allreduce(3, 4000, 2).unwrap();
    assert_eq!((b.ranks, b.bytes, b.iters), (3, 4000, 2));
}

#[test]
fn a_cpu_worker_offers_no_nccl_id() {
    assert!(offered_nccl_id(&candle_core::Device::Cpu).is_empty());
}

#[test]
fn the_ring_abort_handle_works_through_the_abort_trait() {
    let aborted = with_ring(2, |mut ring| {
        let handle: Box<dyn Abort> = Box::new(ring.abort_handle());
        handle.abort();
        matches!(ring.all_reduce_sum(&mut [1.0]), Err(Error::Aborted(_)))
    });
    assert_eq!(aborted, [true, true]);
}

/// Rank 0 of a ring of two, connecting with a 60 s deadline and a cancel flag; rank 1's ring address is `next` (the
/// test plays rank 1 there, or nothing does). `meanwhile` runs on this thread with rank 0's ring address and must set
/// the flag once rank 0 is where the test wants it; what it returns is kept open until connect has returned. If the
/// flag were ignored, connect would take the full 60 s.
fn connect_cancelled<T>(next: String, meanwhile: impl FnOnce(&str, &AtomicBool) -> T) -> (Result<Ring>, T) {
    let listener = RingListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![listener.local_addr().to_string(), next];
    let cancel = Arc::new(AtomicBool::new(false));
    let mut cfg = config(0, &peers, Duration::from_secs(60), "test/gen-1");
    cfg.cancel = Some(cancel.clone());
    thread::scope(|s| {
        let connecting = s.spawn(|| Ring::connect(&listener, cfg));
        let kept = meanwhile(&peers[0], &cancel);
        (connecting.join().unwrap(), kept)
    })
}

/// Plays rank 1 of `connect_cancelled`'s ring on `stream`, which dialled rank 0 (`Connector`) or was dialled by it.
fn play_rank_1(stream: &TcpStream, role: RingRole) {
    let token = token();
    let hello = Hello {
        rank: 1,
        world_size: 2,
        session: "test/gen-1",
    };
    let ours = super::handshake::Local {
        hello,
        token: &token,
        role,
    };
    handshake(stream, &ours, 0, Instant::now() + TIMEOUT).unwrap();
}

/// Reads rank 0's hello on `stream`: its handshake there is under way.
fn read_hello_of_rank_0(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut hello = vec![0u8; 8 + 16 + "test/gen-1".len() + 32];
    stream.read_exact(&mut hello).unwrap();
    assert!(hello.starts_with(b"LKSTRING"), "{hello:02x?}");
}

/// The neighbour's address takes the dial (its kernel does) but nothing there ever answers, and no predecessor comes.
#[test]
fn cancel_interrupts_connect_to_a_neighbour_that_never_answers() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let (result, _dialled) = connect_cancelled(silent.local_addr().unwrap().to_string(), |_, cancel| {
        let (mut dialled, _) = silent.accept().unwrap();
        read_hello_of_rank_0(&mut dialled);
        cancel.store(true, Ordering::SeqCst);
        dialled
    });
    assert!(matches!(result, Err(Error::Aborted(_))), "{result:?}");
}

/// The successor link is up; rank 0 waits for its predecessor while a stray connection sits in its handshake.
#[test]
fn cancel_interrupts_connect_waiting_for_the_predecessor() {
    let next = TcpListener::bind("127.0.0.1:0").unwrap();
    let (result, (_dialled, mut stray)) = connect_cancelled(next.local_addr().unwrap().to_string(), |rank0, cancel| {
        let (dialled, _) = next.accept().unwrap();
        play_rank_1(&dialled, RingRole::Acceptor);
        let mut stray = TcpStream::connect(rank0).unwrap();
        read_hello_of_rank_0(&mut stray);
        cancel.store(true, Ordering::SeqCst);
        (dialled, stray)
    });
    assert!(matches!(result, Err(Error::Aborted(_))), "{result:?}");
    // The stray's handshake was cut short, not left to its deadline.
    let mut rest = Vec::new();
    stray.read_to_end(&mut rest).unwrap();
}

/// The predecessor link is up; rank 0 keeps dialling a successor whose address refuses connections.
#[test]
fn cancel_interrupts_connect_retrying_a_refusing_neighbour() {
    // A port that was just free: nothing listens there.
    let gone = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (result, _prev) = connect_cancelled(gone, |rank0, cancel| {
        let prev = TcpStream::connect(rank0).unwrap();
        play_rank_1(&prev, RingRole::Connector);
        cancel.store(true, Ordering::SeqCst);
        prev
    });
    assert!(matches!(result, Err(Error::Aborted(_))), "{result:?}");
}

/// The predecessor link is up; rank 0's dial was taken but its handshake gets no answer.
#[test]
fn cancel_interrupts_the_handshake_of_a_dial() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let (result, _kept) = connect_cancelled(silent.local_addr().unwrap().to_string(), |rank0, cancel| {
        let prev = TcpStream::connect(rank0).unwrap();
        play_rank_1(&prev, RingRole::Connector);
        let (mut dialled, _) = silent.accept().unwrap();
        read_hello_of_rank_0(&mut dialled);
        cancel.store(true, Ordering::SeqCst);
        (prev, dialled)
    });
    assert!(matches!(result, Err(Error::Aborted(_))), "{result:?}");
}
