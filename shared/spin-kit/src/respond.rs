//! Handing an HTTP component's answer to the host with its body already written, so that the
//! head and the body leave in one write.
//!
//! spin-sdk's `#[http_component]` hands the response over first and writes the body after it:
//! the host's HTTP server then often writes the head on its own, and the body a moment later
//! as a second small write. Spin's listener leaves Nagle's algorithm on, so that second write
//! waits for the client to acknowledge the head, and a keep-alive client delays that
//! acknowledgement by up to 40 ms: measured under Spin 3.6.3, 131 of 200 forged webhooks on
//! one connection took 42 ms instead of 1 ms, and one signed webhook at a time averaged 13 ms
//! with a p50 of 4 ms (`docs/performance.md`, "The 40 ms tails"). Meta keeps its connections
//! open, so this was every webhook's tail. Written before the hand-over, the body is in the
//! host's buffer when the server writes the head, and both go out together.
//!
//! Every HTTP component's handler takes the `ResponseOutparam` and calls [`respond`].

use spin_sdk::http::{OutgoingBody, OutgoingResponse, Response, ResponseOutparam};

/// Sends `response`: its body written (and the body finished) before the head is handed to the
/// host, when the host's buffer takes the whole body at once (wasmtime's holds one write of up
/// to 1 MiB); a larger body is streamed after the head, as it must be.
pub fn respond(out: ResponseOutparam, mut response: Response) {
    let body = std::mem::take(response.body_mut());
    let outgoing: OutgoingResponse = match response.try_into() {
        Ok(r) => r,
        Err(e) => {
            // Headers spin-sdk cannot express: the host answers 500 when the handler sets none.
            eprintln!("could not convert the response: {e}");
            return;
        }
    };
    let Ok(sink) = outgoing.body() else {
        eprintln!("the response body was taken already");
        return;
    };
    let Ok(stream) = sink.write() else {
        eprintln!("the response body stream was taken already");
        return;
    };
    let fits = stream.check_write().is_ok_and(|n| n >= body.len() as u64);
    if fits {
        if !body.is_empty() && stream.write(&body).is_err() {
            eprintln!("could not write the response body");
        }
        drop(stream);
        let _ = OutgoingBody::finish(sink, None);
        out.set(outgoing);
        return;
    }
    out.set(outgoing);
    // The client reads the head meanwhile, and with it takes what is written here.
    for chunk in body.chunks(4096) {
        if stream.blocking_write_and_flush(chunk).is_err() {
            // The client went away: nothing to answer to.
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(sink, None);
}
