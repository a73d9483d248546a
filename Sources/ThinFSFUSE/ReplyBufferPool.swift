import Synchronization

/// Reply buffers for reads and directory listings, reused across requests.
///
/// libfuse's worker threads are its own (and with the default configuration never
/// exit), so a buffer per request would be pure churn: a worker takes a buffer, fills
/// it, hands it to `fuse_reply_buf` (which writes it to /dev/fuse before returning) and
/// gives it back. The pool grows to the number of requests in flight at once, at most
/// one buffer per worker thread, and stays there.
final class ReplyBufferPool: Sendable {
    /// A buffer owned by whoever took it from the pool until it is given back.
    struct Buffer: @unchecked Sendable {
        // @unchecked: the pool hands each buffer to one taker at a time; the memory is
        // never shared between threads while in use.
        let bytes: UnsafeMutableRawBufferPointer
    }

    let bufferSize: Int
    private let free: Mutex<[Buffer]>

    init(bufferSize: Int, expectedConcurrency: Int) {
        self.bufferSize = bufferSize
        var initial: [Buffer] = []
        // Reserve once so that giving buffers back never reallocates in steady state.
        initial.reserveCapacity(max(expectedConcurrency, 1) * 2)
        free = Mutex(initial)
    }

    deinit {
        free.withLock { buffers in
            for b in buffers { b.bytes.deallocate() }
            buffers.removeAll()
        }
    }

    /// Runs `body` with a buffer of `bufferSize` bytes, page-aligned.
    func withBuffer<T>(_ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        let buffer = free.withLock { $0.popLast() }
            ?? Buffer(bytes: .allocate(byteCount: bufferSize, alignment: 4096))
        defer { free.withLock { $0.append(buffer) } }
        return try body(buffer.bytes)
    }
}
