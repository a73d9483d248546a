#if canImport(Glibc)
import Glibc
#endif

/// A pthread mutex. Used where a lock must be held across calls that are not
/// closures (the stripe locks of the I/O path), and where `Mutex` would force
/// `sending` on non-Sendable state.
public final class Lock: @unchecked Sendable {
    private let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)

    public init() { pthread_mutex_init(m, nil) }
    deinit {
        pthread_mutex_destroy(m)
        m.deallocate()
    }

    public func lock() { pthread_mutex_lock(m) }
    public func unlock() { pthread_mutex_unlock(m) }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A reader-writer lock that prefers writers by default, so a commit is not starved by a
/// stream of I/O (glibc's default kind prefers readers). One that prefers readers lets a
/// thread take the read side again while it holds it, even with a writer waiting (with writer
/// preference that inner read would wait for the writer, which waits for the outer read).
public final class ReadWriteLock: @unchecked Sendable {
    private let l = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)

    public init(preferringWriters: Bool = true) {
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(preferringWriters ? PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP : PTHREAD_RWLOCK_PREFER_READER_NP))
        pthread_rwlock_init(l, &attr)
        pthread_rwlockattr_destroy(&attr)
    }
    deinit {
        pthread_rwlock_destroy(l)
        l.deallocate()
    }

    @inline(__always)
    public func withReadLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_rwlock_rdlock(l)
        defer { pthread_rwlock_unlock(l) }
        return try body()
    }

    @inline(__always)
    public func withWriteLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_rwlock_wrlock(l)
        defer { pthread_rwlock_unlock(l) }
        return try body()
    }
}
