//! WASI I/O (`wasi:io/streams`, `wasi:io/poll`) for plugins, replacing wasmtime-wasi's
//! synchronous versions. Those run each blocking operation in a tokio `block_on`, which
//! panics when a plugin is called from an async task (where pipelines call it), and they
//! wait without bound, so a guest sleeping on a pollable would outlive its deadline (epoch
//! interruption only stops wasm code). Here a blocking operation completes at once when it
//! can (the plugins' stdio are sinks, always ready), and otherwise waits no later than the
//! current call's deadline, then fails the call as a timeout. Writes are bounded before any
//! allocation: one operation moves at most [`MAX_STREAM_OP_BYTES`] (what `check-write`
//! grants), and a call's writes together at most the host's per-call stdio budget, so a
//! guest asking to write 64 GiB of zeroes gets a typed error, not a host abort.
//!
//! `wasi:sockets/udp-create-socket` is replaced too: wasmtime-wasi's version nests a tokio
//! runtime before it checks the (always denied) permission, which panics on an async
//! task. Plugins have no network, so it refuses at once; TCP creation is refused by
//! wasmtime-wasi without nesting, and with no socket and no preopened folder no other
//! runtime-nesting call can be reached (they all need a socket or a file descriptor).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::bindings::sync::sockets::udp_create_socket;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    Host as AsyncHost, HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};

use super::error::LimitExceeded;
use super::instance::StoreState;

/// Most bytes one stream operation moves: the WASI limit of the blocking writes, and what
/// `check-write` grants at most, so the host never allocates more per operation.
pub(crate) const MAX_STREAM_OP_BYTES: u64 = 4096;

/// How often a pending operation is polled again while it waits: short against call
/// deadlines (tens of ms), long enough not to spin a core.
const REPOLL: Duration = Duration::from_millis(1);

/// The I/O view of a store: its resource table, the current call's deadline and its
/// written bytes.
pub(crate) struct SyncIo<'a> {
    table: &'a mut ResourceTable,
    deadline: Instant,
    written: &'a mut u64,
    max_written: u64,
}

pub(crate) struct SyncIoData;

impl HasData for SyncIoData {
    type Data<'a> = SyncIo<'a>;
}

pub(crate) fn view(state: &mut StoreState) -> SyncIo<'_> {
    let deadline = state.deadline;
    let max_written = state.max_stdio;
    let (table, written) = state.io_parts();
    SyncIo {
        table,
        deadline,
        written,
        max_written,
    }
}

/// Shadows wasmtime-wasi's synchronous `wasi:io/streams`, `wasi:io/poll` and
/// `wasi:sockets/udp-create-socket`.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<StoreState>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    poll::add_to_linker::<StoreState, SyncIoData>(linker, view)?;
    streams::add_to_linker::<StoreState, SyncIoData>(linker, view)?;
    udp_create_socket::add_to_linker::<StoreState, NoNetwork>(linker, |_| NoNetwork)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The network of a plugin: none.
pub(crate) struct NoNetwork;

impl HasData for NoNetwork {
    type Data<'a> = NoNetwork;
}

/// Required by the bindings for error conversion; only `create-udp-socket` is linked from
/// here (the rest of `wasi:sockets/network` stays wasmtime-wasi's).
impl wasmtime_wasi::p2::bindings::sockets::network::Host for NoNetwork {
    fn convert_error_code(
        &mut self,
        error: wasmtime_wasi::p2::SocketError,
    ) -> wasmtime::Result<wasmtime_wasi::p2::bindings::sockets::network::ErrorCode> {
        error.downcast()
    }

    fn network_error_code(
        &mut self,
        _error: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<wasmtime_wasi::p2::bindings::sockets::network::ErrorCode>> {
        Ok(None)
    }
}

impl wasmtime_wasi::p2::bindings::sockets::network::HostNetwork for NoNetwork {
    fn drop(
        &mut self,
        _network: Resource<wasmtime_wasi::p2::bindings::sockets::network::Network>,
    ) -> wasmtime::Result<()> {
        // Never linked from here: wasmtime-wasi's `wasi:sockets/network` owns networks.
        Ok(())
    }
}

impl udp_create_socket::Host for NoNetwork {
    fn create_udp_socket(
        &mut self,
        _family: udp_create_socket::IpAddressFamily,
    ) -> wasmtime_wasi::p2::SocketResult<Resource<wasmtime_wasi::p2::UdpSocket>> {
        Err(wasmtime_wasi::p2::bindings::sync::sockets::network::ErrorCode::AccessDenied.into())
    }
}

impl SyncIo<'_> {
    /// Fails an operation of more than [`MAX_STREAM_OP_BYTES`].
    fn one_op(len: u64) -> StreamResult<()> {
        if len > MAX_STREAM_OP_BYTES {
            return Err(over(LimitExceeded {
                what: "bytes in one stream write",
                limit: MAX_STREAM_OP_BYTES,
                asked: len,
            }));
        }
        Ok(())
    }

    /// Counts `len` written bytes against the call's budget, failing when it is spent.
    fn charge(&mut self, len: u64) -> StreamResult<()> {
        let total = self.written.saturating_add(len);
        if total > self.max_written {
            return Err(over(LimitExceeded {
                what: "stdout and stderr bytes in one call",
                limit: self.max_written,
                asked: total,
            }));
        }
        *self.written = total;
        Ok(())
    }

    /// What a splice of `len` may move (a splice may move less than asked).
    fn splice_len(&mut self, len: u64) -> StreamResult<u64> {
        if len > 0 && self.left() == 0 {
            self.charge(len)?;
        }
        Ok(len.min(MAX_STREAM_OP_BYTES).min(self.left()))
    }

    fn left(&self) -> u64 {
        self.max_written.saturating_sub(*self.written)
    }
}

/// A limit as a stream error: it traps the call, and the call's error names the limit.
fn over(limit: LimitExceeded) -> wasmtime_wasi::p2::StreamError {
    wasmtime_wasi::p2::StreamError::Trap(limit.into())
}

/// Runs `future` on this thread until it completes or `deadline` passes. It is polled
/// without a waker of its own: ready futures (stdio sinks) finish on the first poll, and
/// others are polled again every [`REPOLL`]. Timers and I/O drivers come from the caller's
/// tokio runtime when there is one, otherwise from wasmtime-wasi's own.
fn before_deadline<F: Future>(deadline: Instant, future: F) -> wasmtime::Result<F::Output> {
    wasmtime_wasi::runtime::with_ambient_tokio_runtime(|| {
        let mut future = pin!(future);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
                return Ok(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Reported like an epoch interruption: the call ran out of time.
                return Err(wasmtime::Trap::Interrupt.into());
            }
            std::thread::sleep(left.min(REPOLL));
        }
    })
}

/// `before_deadline` for stream operations, whose result carries the trap in its error.
fn stream_before<T>(
    deadline: Instant,
    future: impl Future<Output = StreamResult<T>>,
) -> StreamResult<T> {
    match before_deadline(deadline, future) {
        Ok(result) => result,
        Err(trap) => Err(wasmtime_wasi::p2::StreamError::Trap(trap)),
    }
}

impl poll::Host for SyncIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        let deadline = self.deadline;
        before_deadline(deadline, async_poll::Host::poll(self.table, pollables))?
    }
}

impl poll::HostPollable for SyncIo<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        let deadline = self.deadline;
        before_deadline(
            deadline,
            async_poll::HostPollable::ready(self.table, pollable),
        )?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        let deadline = self.deadline;
        before_deadline(
            deadline,
            async_poll::HostPollable::block(self.table, pollable),
        )?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.table, pollable)
    }
}

impl streams::Host for SyncIo<'_> {
    fn convert_stream_error(
        &mut self,
        err: wasmtime_wasi::p2::StreamError,
    ) -> wasmtime::Result<streams::StreamError> {
        Ok(AsyncHost::convert_stream_error(self.table, err)?.into())
    }
}

impl streams::HostOutputStream for SyncIo<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        let deadline = self.deadline;
        before_deadline(deadline, AsyncOutput::drop(self.table, stream))?
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        if self.left() == 0 {
            // Nothing more may be written in this call; waiting would only spin.
            return self.charge(1).map(|()| 0);
        }
        let permit = AsyncOutput::check_write(self.table, stream)?;
        Ok(permit.min(MAX_STREAM_OP_BYTES).min(self.left()))
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        Self::one_op(bytes.len() as u64)?;
        self.charge(bytes.len() as u64)?;
        AsyncOutput::write(self.table, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        Self::one_op(bytes.len() as u64)?;
        self.charge(bytes.len() as u64)?;
        let deadline = self.deadline;
        stream_before(
            deadline,
            AsyncOutput::blocking_write_and_flush(self.table, stream, bytes),
        )
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        Self::one_op(len)?;
        self.charge(len)?;
        let deadline = self.deadline;
        stream_before(
            deadline,
            AsyncOutput::blocking_write_zeroes_and_flush(self.table, stream, len),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncOutput::subscribe(self.table, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        // Checked before wasmtime-wasi allocates `len` zeroes.
        Self::one_op(len)?;
        self.charge(len)?;
        AsyncOutput::write_zeroes(self.table, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        AsyncOutput::flush(self.table, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        let deadline = self.deadline;
        stream_before(deadline, AsyncOutput::blocking_flush(self.table, stream))
    }

    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        let len = self.splice_len(len)?;
        let moved = AsyncOutput::splice(self.table, dst, src, len)?;
        self.charge(moved)?;
        Ok(moved)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        let len = self.splice_len(len)?;
        let deadline = self.deadline;
        let moved = stream_before(
            deadline,
            AsyncOutput::blocking_splice(self.table, dst, src, len),
        )?;
        self.charge(moved)?;
        Ok(moved)
    }
}

impl streams::HostInputStream for SyncIo<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        let deadline = self.deadline;
        before_deadline(deadline, AsyncInput::drop(self.table, stream))?
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncInput::read(self.table, stream, len.min(MAX_STREAM_OP_BYTES))
    }

    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        let deadline = self.deadline;
        stream_before(
            deadline,
            AsyncInput::blocking_read(self.table, stream, len.min(MAX_STREAM_OP_BYTES)),
        )
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        AsyncInput::skip(self.table, stream, len.min(MAX_STREAM_OP_BYTES))
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        let deadline = self.deadline;
        stream_before(
            deadline,
            AsyncInput::blocking_skip(self.table, stream, len.min(MAX_STREAM_OP_BYTES)),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncInput::subscribe(self.table, stream)
    }
}
