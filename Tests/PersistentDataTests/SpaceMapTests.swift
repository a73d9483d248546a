import TestSupport
import Testing
@testable import PersistentData

@Suite struct SpaceMapTests {
    /// The kernel's 2-bit entries (`sm_lookup_bitmap`): entry k of a
    /// little-endian word has its high bit at 2k and its low bit at 2k + 1.
    @Test func bitmapLayoutIsTheKernels() throws {
        let sm = SpaceMap(nrBlocks: 100)
        try sm.set(0, count: 1)   // low bit of entry 0: bit 1
        try sm.set(1, count: 2)   // high bit of entry 1: bit 2
        try sm.set(2, count: 7)   // 3 (both bits 4 and 5), the count itself in the ref-count tree
        try sm.set(33, count: 1)  // second word, bit 3
        let block = MetadataBlock(location: 5)
        sm.storeBitmap(0, into: block)
        #expect(block.u64(16) == 0b11_0110)
        #expect(block.u64(24) == 0b1000)
        #expect(sm.count(2) == 7)
        #expect(sm.overflowDirty == [2])
    }

    /// Bitmaps and overflow counts written and read back, over three bitmaps
    /// of which the last is partial.
    @Test func roundTripAcrossBitmaps() throws {
        var rng = SeededRandom(seed: 5)
        let nrBlocks: UInt64 = 2 * 16320 + 777
        let sm = SpaceMap(nrBlocks: nrBlocks)
        for _ in 0..<5000 {
            try sm.set(UInt64.random(in: 0..<nrBlocks, using: &rng), count: UInt32.random(in: 0...6, using: &rng))
        }
        try sm.set(nrBlocks - 1, count: 300)
        let loaded = SpaceMap(nrBlocks: nrBlocks)
        for i in 0..<sm.nrBitmaps {
            let block = MetadataBlock(location: UInt64(i + 1))
            sm.storeBitmap(i, into: block)
            loaded.loadBitmap(i, from: block)
        }
        #expect(sm.nrBitmaps == 3)
        // The block with count 3+ but no overflow entry is found, then supplied.
        var missing: [UInt64] = []
        while let b = loaded.finishLoad() {
            missing.append(b)
            loaded.loadOverflow(b, sm.count(b))
        }
        #expect(missing.count == sm.overflow.count)
        #expect(loaded.nrAllocated == sm.nrAllocated)
        for b in 0..<nrBlocks where loaded.count(b) != sm.count(b) {
            Issue.record("block \(b): \(loaded.count(b)) read back, \(sm.count(b)) written")
            break
        }
        for i in 0..<3 {
            let start = UInt64(i * 16320), end = min(start + 16320, nrBlocks)
            let used = (start..<end).filter { sm.count($0) > 0 }.count
            let firstFree = (start..<end).first { sm.count($0) == 0 }.map { Int($0 - start) } ?? Int(end - start)
            #expect(sm.bitmapUsage(i) == (used, firstFree))
        }
    }

    /// Crash safety: a block is handed out only if it is free now and in the
    /// last committed state (`sm_ll_find_common_free_block`).
    @Test func freedBlocksWaitForTheCommit() throws {
        let sm = SpaceMap(nrBlocks: 64)
        for _ in 0..<64 { #expect(sm.allocate() != nil) }
        #expect(sm.allocate() == nil)
        sm.didCommit()
        try sm.dec(10)
        try sm.dec(40)
        #expect(sm.nrFree == 2)
        #expect(sm.allocate() == nil, "freed in this transaction, still live on disk")
        sm.didCommit()
        #expect(sm.allocate() == 10)
        #expect(sm.allocate() == 40)
        #expect(sm.allocate() == nil)
        // Allocated and freed within one transaction: never on disk, so reusable at once.
        sm.didCommit()
        try sm.dec(10)
        sm.didCommit()
        let b = sm.allocate()!
        try sm.dec(b)
        #expect(sm.allocate() == b)
    }
}
