import Foundation
import TestSupport
import Testing
@testable import PersistentData

/// A btree over an in-memory device, with its own metadata space map and a
/// second space map standing in for data blocks (the values hold references
/// to them, as a thin device's mappings do).
final class TreeBench {
    let storage = MemoryMetadataStorage(nrBlocks: 16384)
    let bm: BlockManager
    let sm: SpaceMap
    let tm: TransactionManager
    let data = SpaceMap(nrBlocks: 1 << 20)
    let tree: BTree<UInt64>

    init() throws {
        bm = BlockManager(storage: storage)
        sm = SpaceMap(nrBlocks: storage.nrBlocks)
        // Block 0 stands for the superblock: never allocated, never flushed.
        try sm.set(0, count: 1)
        tm = TransactionManager(bm: bm, sm: sm)
        let data = self.data
        tree = BTree<UInt64>(tm: tm, incValue: { v throws(MetadataError) in try data.inc(v) }, decValue: { v throws(MetadataError) in try data.dec(v) })
    }

    /// What a commit does to the blocks: seal and write them, then make the
    /// counts the committed state, so later changes must shadow.
    func commit() throws {
        try bm.flushDirty(except: 0)
        sm.didCommit()
        data.didCommit()
    }

    /// Inserts `key` with a fresh data block, dropping the overwritten value's reference.
    func insert(_ root: inout UInt64, _ key: UInt64) throws -> UInt64 {
        let value = data.allocate()!
        let r = try tree.insert(root, key, value)
        root = r.root
        if let old = r.old { try data.dec(old) }
        return value
    }

    func remove(_ root: inout UInt64, _ key: UInt64) throws -> UInt64? {
        let r = try tree.remove(root, key)
        root = r.root
        if let old = r.old { try data.dec(old) }
        return r.old
    }

    func contents(_ root: UInt64) throws -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        try tree.forEach(root) { k, v in out.append((k, v)); return true }
        return out
    }

    /// Walks the trees at `roots` independently of the checker and returns the
    /// broken invariants. Each distinct node is read once and counted once per
    /// parent node (or root) referencing it; each value once per distinct leaf.
    /// Then every count must match the space maps exactly: a node or data block
    /// the trees do not reach must be free.
    func violations(roots: [UInt64]) throws -> [String] {
        var problems: [String] = []
        var refs: [UInt64: UInt32] = [0: 1]
        var dataRefs: [UInt64: UInt32] = [:]
        var height: [UInt64: Int] = [:]
        func visit(_ b: UInt64, lower: UInt64?, upper: UInt64?, isRoot: Bool) throws -> Int {
            refs[b, default: 0] += 1
            if refs[b]! > 1, let h = height[b] { return h }
            let n = try tm.read(b, as: .btreeNode)
            try BTreeNode.validate(n, leafValueSize: 8, tree: "test")
            let c = BTreeNode.count(n), max = BTreeNode.maxEntries(n)
            if !isRoot && c < max / 3 { problems.append("node \(b): \(c) entries < \(max / 3)") }
            for i in 0..<c {
                let k = BTreeNode.key(n, i)
                if i > 0 && k <= BTreeNode.key(n, i - 1) { problems.append("node \(b): key \(i) out of order") }
                if let lower, k < lower, i == 0 { problems.append("node \(b): key \(k) below parent key \(lower)") }
                if let upper, k >= upper { problems.append("node \(b): key \(k) not below \(upper)") }
            }
            var h = 0
            if BTreeNode.isLeaf(n) {
                for i in 0..<c { dataRefs[BTreeNode.child(n, i), default: 0] += 1 }
            } else {
                var depths = Set<Int>()
                for i in 0..<c {
                    depths.insert(try visit(BTreeNode.child(n, i), lower: BTreeNode.key(n, i),
                                            upper: i + 1 < c ? BTreeNode.key(n, i + 1) : upper, isRoot: false))
                }
                if depths.count > 1 { problems.append("node \(b): leaves at depths \(depths)") }
                h = (depths.max() ?? 0) + 1
            }
            height[b] = h
            return h
        }
        for r in roots { _ = try visit(r, lower: nil, upper: nil, isRoot: true) }
        for b in 0..<sm.nrBlocks where sm.count(b) != refs[b] ?? 0 {
            problems.append("metadata block \(b): count \(sm.count(b)), referenced \(refs[b] ?? 0) times")
        }
        data.forEachAllocated { b, c in
            if c != dataRefs[b] ?? 0 { problems.append("data block \(b): count \(c), referenced \(dataRefs[b] ?? 0) times") }
        }
        for (b, c) in dataRefs where data.count(b) == 0 { problems.append("data block \(b): free, referenced \(c) times") }
        return problems
    }
}

@Suite struct BTreeTests {
    /// Random inserts, overwrites and removes against a Dictionary. Keys come
    /// from a bounded range so that overwrites and removes hit; the tree grows
    /// to two levels and shrinks back as the mix changes.
    @Test(arguments: [
        (seed: UInt64(1), keySpace: UInt64(4000)),         // dense keys, two levels
        (seed: UInt64(2), keySpace: UInt64(40_000)),       // sparse keys, mostly inserts
        (seed: UInt64(0xDEADBEEF), keySpace: UInt64.max),  // keys across the whole u64 range
    ])
    func randomOperationsMatchAModel(seed: UInt64, keySpace: UInt64) throws {
        let bench = try TreeBench()
        var rng = SeededRandom(seed: seed)
        var model: [UInt64: UInt64] = [:]
        // The model's keys in an array too, so a random one is O(1) to pick and drop.
        var keys: [UInt64] = [], slot: [UInt64: Int] = [:]
        var root = try bench.tree.create()
        for batch in 0..<24 {
            // The first half of the run grows the tree, the second shrinks it.
            let removeShare = batch < 12 ? 0.25 : 0.7
            for _ in 0..<1500 {
                let key = keySpace == .max ? rng.next() : UInt64.random(in: 0..<keySpace, using: &rng)
                if Double.random(in: 0..<1, using: &rng) < removeShare, !keys.isEmpty {
                    let i = Int.random(in: 0..<keys.count, using: &rng)
                    let k = keys[i]
                    keys.swapAt(i, keys.count - 1)
                    slot[keys[i]] = i
                    keys.removeLast()
                    slot[k] = nil
                    let old = try bench.remove(&root, k)
                    #expect(old == model.removeValue(forKey: k), "seed \(seed): remove \(k)")
                } else {
                    if slot[key] == nil {
                        slot[key] = keys.count
                        keys.append(key)
                    }
                    model[key] = try bench.insert(&root, key)
                }
            }
            let problems = try bench.violations(roots: [root])
            #expect(problems.isEmpty, "seed \(seed) batch \(batch): \(problems.prefix(5))")
            let contents = try bench.contents(root)
            #expect(contents.map(\.0) == model.keys.sorted(), "seed \(seed) batch \(batch): forEach order")
            #expect(contents.allSatisfy { model[$0.0] == $0.1 }, "seed \(seed) batch \(batch): values")
            for _ in 0..<200 {
                let k = keySpace == .max ? rng.next() : UInt64.random(in: 0..<keySpace, using: &rng)
                #expect(try bench.tree.lookup(root, k) == model[k], "seed \(seed): lookup \(k)")
            }
            for k in model.keys.prefix(200) {
                #expect(try bench.tree.lookup(root, k) == model[k], "seed \(seed): lookup \(k)")
            }
            // forEach from a middle key starts at the first key at or above it.
            if let mid = model.keys.sorted().dropFirst(model.count / 2).first {
                var firstSeen: UInt64?
                try bench.tree.forEach(root, from: mid - (mid > 0 ? 1 : 0)) { k, _ in firstSeen = k; return false }
                #expect(firstSeen == model.keys.filter { $0 >= mid - (mid > 0 ? 1 : 0) }.min(), "seed \(seed)")
            }
            // Alternate between batches inside one transaction and committed ones,
            // so that both the in-place and the copying shadow are exercised.
            if batch % 2 == 1 { try bench.commit() }
        }
        // Emptying the tree leaves a single empty leaf.
        for k in model.keys { _ = try bench.remove(&root, k) }
        try bench.commit()
        #expect(try bench.contents(root).isEmpty)
        #expect(bench.sm.nrAllocated == 2, "seed \(seed): superblock and the root leaf")
        #expect(bench.data.nrAllocated == 0)
        #expect(try bench.violations(roots: [root]).isEmpty)
    }

    /// Ascending and descending runs split at one edge of the tree only, so
    /// leaves are left half full; 40000 keys make three levels. Every node must
    /// still be at least a third full, also while the tree is removed from one
    /// end (every rebalance is then against the same sibling).
    @Test(arguments: [false, true])   // descending
    func sequentialInsertsAndRemoves(descending: Bool) throws {
        let bench = try TreeBench()
        var root = try bench.tree.create()
        let keys = Array(UInt64(0)..<40_000)
        for k in descending ? keys.reversed() : keys { _ = try bench.insert(&root, k * 3) }
        try bench.commit()
        var depth = 0
        try bench.tree.forEachNode(root) { _, d in depth = max(depth, d) }
        #expect(depth == 2, "three levels: root, internal, leaves")
        #expect(try bench.violations(roots: [root]).isEmpty)
        #expect(try bench.contents(root).map(\.0) == keys.map { $0 * 3 })
        for (i, k) in keys.prefix(39_000).enumerated() {
            _ = try bench.remove(&root, k * 3)
            if i % 5000 == 0 { #expect(try bench.violations(roots: [root]).isEmpty, "after \(i) removes") }
        }
        #expect(try bench.violations(roots: [root]).isEmpty)
        #expect(try bench.contents(root).map(\.0) == keys.dropFirst(39_000).map { $0 * 3 })
    }

    /// `tm.inc(root)` gives a second owner of the same tree (what a thin
    /// snapshot does). Changing one copy must leave the other as it was, and
    /// deleting both must free every node and every value's reference.
    @Test(arguments: [true, false])   // whether the tree is committed before it is shared
    func snapshotCopiesAreIndependent(committedFirst: Bool) throws {
        let bench = try TreeBench()
        let baseline = bench.sm.nrAllocated
        var rng = SeededRandom(seed: 7)
        var original: [UInt64: UInt64] = [:]
        var root = try bench.tree.create()
        for _ in 0..<5000 {
            let k = UInt64.random(in: 0..<20_000, using: &rng)
            original[k] = try bench.insert(&root, k)
        }
        if committedFirst { try bench.commit() }

        let snapshot = root
        try bench.tm.inc(root)
        var changed = original
        var copy = root
        for i in 0..<3000 {
            let k = UInt64.random(in: 0..<20_000, using: &rng)
            if i % 3 == 0, let victim = changed.keys.first(where: { $0 >= k }) ?? changed.keys.first {
                _ = try bench.remove(&copy, victim)
                changed[victim] = nil
            } else {
                changed[k] = try bench.insert(&copy, k)
            }
        }
        #expect(copy != snapshot)
        let snapshotContents = try bench.contents(snapshot)
        #expect(snapshotContents.map(\.0) == original.keys.sorted())
        #expect(snapshotContents.allSatisfy { original[$0.0] == $0.1 })
        let copyContents = try bench.contents(copy)
        #expect(copyContents.map(\.0) == changed.keys.sorted())
        #expect(copyContents.allSatisfy { changed[$0.0] == $0.1 })
        // The two trees still share the nodes the changes did not reach; the
        // counts must say so exactly.
        #expect(try bench.violations(roots: [snapshot, copy]) == [])
        try bench.commit()

        try bench.tree.delete(copy)
        #expect(try bench.violations(roots: [snapshot]) == [])
        #expect(try bench.contents(snapshot).map(\.0) == original.keys.sorted())
        try bench.tree.delete(snapshot)
        #expect(bench.sm.nrAllocated == baseline)
        #expect(bench.data.nrAllocated == 0)
    }
}
