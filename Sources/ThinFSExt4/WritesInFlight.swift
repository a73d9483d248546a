import Foundation

// Writes whose data goes to the device outside the volume's lock: the rules, and the byte ranges
// such writes hold. No libext2fs here.
//
// A write of `Volume.unlockedWriteMinimum` bytes or more to an extent-mapped file runs in three
// steps (`Volume.write`):
//
//     reserve(ino, bytes) ─────────────────────────────────────────────────────────────┐
//     dataGate (shared) ───────────────────────────────────────────────────────────┐   │
//       1. volume lock: map and allocate the whole blocks (initialized extents),    │   │
//          write the partial head block, drop the cached copies of the whole blocks │   │
//       2. no lock:     BlockDevice.writeFileData of each run of whole blocks       │   │
//       3. volume lock: grow the size, write the partial tail block, set the times  │   │
//                       (or, if step 2 failed, unmap what step 1 mapped)            │   │
//     ─────────────────────────────────────────────────────────────────────────────┘   │
//     release ─────────────────────────────────────────────────────────────────────────┘
//
// Invariants, each with what keeps it:
//
// 1. A commit never publishes a write between steps 1 and 3. Between them the file has
//    initialized blocks whose data may not be on the device, past its size when it grows (e2fsck:
//    "i_size is ..., should be ..."). Every path that flushes libext2fs's state to the device and
//    flushes the device (`fsync`, `withFlushedState`, close, `reopen`) takes `dataGate` exclusively
//    before the volume's lock, so it waits for the writes in flight and holds new ones off.
// 2. A block written in step 2 is neither freed nor moved before step 2 ends: freed, it could be
//    given to another file, and the bytes would land in that file. A write's blocks are its file's,
//    and only a size change, fallocate or a resize frees or moves a file's blocks while the file is
//    open (an inode is freed only once nothing holds it, and a write holds it). Those take
//    `dataGate` exclusively too. (The kernel orders them after the WRITEs anyway: FUSE waits for
//    a file's writes in flight before a SETATTR of its size.)
// 3. The block cache holds no copy of a block step 2 writes. Step 1 drops the copies (the write
//    replaces every byte of those blocks) and sends a pending discard first, which could cover
//    them (blocks freed just before and allocated again now). During step 2 only an operation on
//    the same bytes of the same file would cache them through libext2fs: writes whose byte ranges
//    overlap wait for each other (`reserve`), and invariant 2 keeps the others out. Step 3 drops
//    any clean copy again, in case a read went through the cache meanwhile (a full device).
// 4. A failed write, small or large, undoes only its own allocation (`Volume.rollBack`): it
//    unmaps only blocks of its own range (which its reservation keeps every other write out of),
//    and it shrinks the file by setting i_size, not by a truncate, which would free every block
//    past the new end, another write's in-flight blocks among them. Step 3 puts the size back
//    only if nothing changed it since step 1.
//
// Every write, small ones too, holds its byte range (rounded out to 64 KiB) from before step 1 to
// after step 3: a small write runs whole under the lock, but into a block a failed write's step 3
// would unmap.
//
// Lock order: a range (`WritesInFlight.reserve`), then `dataGate`, then the volume's lock. Nothing
// waits for a range while holding the gate, nor for either while holding the volume's lock.

/// The byte ranges of the files that unlocked writes are working on. Overlapping writes to one
/// file wait for each other here, before they take the volume's lock.
final class WritesInFlight: @unchecked Sendable {
    struct Reservation {
        let id: UInt64
        let ino: UInt64
        let bytes: Range<UInt64>
    }

    private let condition = NSCondition()
    private var reservations: [Reservation] = []
    private var nextID: UInt64 = 0

    /// Reserves `bytes` of inode `ino`, waiting while another write holds an overlapping range.
    func reserve(_ ino: UInt64, _ bytes: Range<UInt64>) -> Reservation {
        condition.lock()
        defer { condition.unlock() }
        while reservations.contains(where: { $0.ino == ino && $0.bytes.overlaps(bytes) }) { condition.wait() }
        nextID &+= 1
        let r = Reservation(id: nextID, ino: ino, bytes: bytes)
        reservations.append(r)
        return r
    }

    func release(_ r: Reservation) {
        condition.lock()
        defer { condition.unlock() }
        reservations.removeAll { $0.id == r.id }
        condition.broadcast()
    }

    /// How many writes hold a range (tests).
    var count: Int {
        condition.lock()
        defer { condition.unlock() }
        return reservations.count
    }
}
