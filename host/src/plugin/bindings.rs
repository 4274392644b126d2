//! Host bindings of the four worlds of `staircase:agent@0.1.0`, the router of 0.2.0 and the
//! guard of 0.3.0. The compressor world is the
//! only one importing everything (`types`, `host`, `model`), so it generates those
//! interfaces and the other worlds reuse them: one `Host` implementation serves all kinds.

pub(crate) mod compressor {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "compressor",
        // Host imports may fail the call (a limit exceeded, the deadline passed).
        imports: { default: trappable },
    });
}

pub(crate) mod role {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "role",
        with: {
            "staircase:agent/types": crate::plugin::bindings::compressor::staircase::agent::types,
            "staircase:agent/host": crate::plugin::bindings::compressor::staircase::agent::host,
        },
    });
}

pub(crate) mod aggregator {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "aggregator",
        with: {
            "staircase:agent/types": crate::plugin::bindings::compressor::staircase::agent::types,
            "staircase:agent/host": crate::plugin::bindings::compressor::staircase::agent::host,
        },
    });
}

pub(crate) mod router {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "router",
        with: {
            "staircase:agent/host": crate::plugin::bindings::compressor::staircase::agent::host,
        },
    });
}

pub(crate) use compressor::staircase::agent::{host, model, types};

/// The router of `staircase:agent@0.2.0` (route features and a reason); its `host`
/// interface is 0.1.0's functions under the new version, served by the same code.
pub(crate) mod router_v2 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "router",
        imports: { default: trappable },
    });
}

/// The output guard of `staircase:agent@0.3.0`; its `host` interface is 0.1.0's functions
/// under the new version, served by the same code.
pub(crate) mod guard {
    wasmtime::component::bindgen!({
        path: "../wit/v0.3.0",
        world: "guard",
        imports: { default: trappable },
    });
}
