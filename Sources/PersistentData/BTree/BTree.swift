/// A copy-on-write btree of u64 keys in metadata blocks (dm-btree.c, dm-btree-remove.c).
///
/// Operations take a root and return the new root: every node on a modified
/// path is shadowed through the transaction manager, so the tree reachable
/// from the old root, and any snapshot sharing its nodes, is unchanged.
///
/// When a shared node is shadowed, the copy takes a reference to each child:
/// a metadata block for internal nodes, or `incValue` for the values of a leaf
/// (a subtree root, or a data block). Deleting a tree drops references
/// recursively, calling `decValue` for each value of an unshared leaf.
///
/// Removing or overwriting a key returns the old value; the caller drops the
/// reference it held, if any.
public struct BTree<Value: BTreeValue> {
    public let tm: TransactionManager
    /// Which tree this is ("mapping", "device details"...), named in errors about its nodes.
    public var name: String
    public var incValue: ((Value) throws(MetadataError) -> Void)?
    public var decValue: ((Value) throws(MetadataError) -> Void)?

    public init(tm: TransactionManager, name: String = "btree",
                incValue: ((Value) throws(MetadataError) -> Void)? = nil,
                decValue: ((Value) throws(MetadataError) -> Void)? = nil) {
        self.tm = tm
        self.name = name
        self.incValue = incValue
        self.decValue = decValue
    }

    public static var leafMaxEntries: Int { BTreeNode.maxEntries(valueSize: Value.size) }

    // MARK: Reading

    func node(_ location: UInt64) throws(MetadataError) -> MetadataBlock {
        // Key order costs a pass over the keys: check it when the node comes from
        // disk, not on every visit of a cached node (the cache only holds checked
        // nodes and the ones this transaction wrote, whose order we keep).
        let fresh = !tm.bm.isCached(location)
        let n = try tm.read(location, as: .btreeNode)
        try BTreeNode.validate(n, leafValueSize: Value.size, tree: name, keyOrder: fresh)
        return n
    }

    /// Child `i` of internal node `n`, refusing a pointer past the metadata device
    /// before anything counts or reads it.
    func child(_ n: MetadataBlock, _ i: Int) throws(MetadataError) -> UInt64 {
        let c = BTreeNode.child(n, i)
        guard c < tm.sm.nrBlocks else {
            throw .inconsistent(block: n.location, tree: name,
                                reason: "child \(i) points to block \(c), beyond the metadata device of \(tm.sm.nrBlocks) blocks")
        }
        return c
    }

    /// An empty tree: a single leaf with no entries.
    public func create() throws(MetadataError) -> UInt64 {
        let n = try tm.newBlock(as: .btreeNode)
        BTreeNode.initialize(n, leaf: true, valueSize: Value.size)
        return n.location
    }

    public func lookup(_ root: UInt64, _ key: UInt64) throws(MetadataError) -> Value? {
        try lookupSharing(root, key)?.value
    }

    /// Looks a key up and reports whether any node on its path is shared
    /// (referenced more than once), which means the value is reachable from
    /// another tree as well.
    public func lookupSharing(_ root: UInt64, _ key: UInt64) throws(MetadataError) -> (value: Value, pathShared: Bool)? {
        var location = root
        var shared = false
        var depth = 0
        while true {
            try checkDepth(depth, at: location)
            depth += 1
            let n = try node(location)
            if tm.refCount(location) > 1 { shared = true }
            let i = BTreeNode.lowerBound(n, key)
            if i < 0 { return nil }
            if BTreeNode.isLeaf(n) {
                guard BTreeNode.key(n, i) == key else { return nil }
                return (Value(loadingFrom: n, at: BTreeNode.valueOffset(n, i)), shared)
            }
            location = try child(n, i)
        }
    }

    /// Visits entries with key >= `from` in order until `body` returns false.
    @discardableResult
    public func forEach(_ root: UInt64, from: UInt64 = 0,
                        _ body: (UInt64, Value) throws -> Bool) throws -> Bool {
        try forEach(root, from: from, depth: 0, body)
    }

    /// A node on disk can point back at one of its ancestors: walks count their depth, and
    /// one past any tree 64-bit keys can fill ends in an error, not a stack overflow (found by
    /// fuzz-btree) or a lookup that never ends. Nodes dm-thin writes are at least a third full
    /// (the root aside), so every real tree is far shallower.
    static var maxDepth: Int { 64 }

    func checkDepth(_ depth: Int, at location: UInt64) throws(MetadataError) {
        guard depth < Self.maxDepth else {
            throw .inconsistent(block: location, tree: name,
                                reason: "the tree is more than \(Self.maxDepth) levels deep: a node leads back to an ancestor")
        }
    }

    private func forEach(_ root: UInt64, from: UInt64, depth: Int,
                         _ body: (UInt64, Value) throws -> Bool) throws -> Bool {
        try checkDepth(depth, at: root)
        let n = try node(root)
        let c = BTreeNode.count(n)
        if BTreeNode.isLeaf(n) {
            var i = max(0, BTreeNode.lowerBound(n, from))
            while i < c {
                let k = BTreeNode.key(n, i)
                if k >= from, !(try body(k, Value(loadingFrom: n, at: BTreeNode.valueOffset(n, i)))) { return false }
                i += 1
            }
            return true
        }
        var i = max(0, BTreeNode.lowerBound(n, from))
        while i < c {
            if !(try forEach(child(n, i), from: from, depth: depth + 1, body)) { return false }
            i += 1
        }
        return true
    }

    /// Visits every node block of the tree (each shared subtree once per path).
    public func forEachNode(_ root: UInt64, _ body: (MetadataBlock, _ depth: Int) throws -> Void, depth: Int = 0) throws {
        try checkDepth(depth, at: root)
        let n = try node(root)
        try body(n, depth)
        if !BTreeNode.isLeaf(n) {
            for i in 0..<BTreeNode.count(n) { try forEachNode(child(n, i), body, depth: depth + 1) }
        }
    }

    // MARK: Shadowing

    /// Makes `location` writable, adding references to its children if it was shared.
    func shadow(_ location: UInt64) throws(MetadataError) -> MetadataBlock {
        let fresh = !tm.bm.isCached(location)
        let (n, incChildren) = try tm.shadow(location, as: .btreeNode)
        try BTreeNode.validate(n, leafValueSize: Value.size, tree: name, keyOrder: fresh)
        if incChildren {
            let c = BTreeNode.count(n)
            if BTreeNode.isLeaf(n) {
                if let incValue {
                    for i in 0..<c { try incValue(Value(loadingFrom: n, at: BTreeNode.valueOffset(n, i))) }
                }
            } else {
                for i in 0..<c { try tm.inc(child(n, i)) }
            }
        }
        return n
    }

    // MARK: Insert

    private enum Insertion {
        case single(UInt64)
        case split(left: UInt64, right: UInt64, rightKey: UInt64)
    }

    /// Inserts or overwrites `key`. Returns the new root and the overwritten value.
    public func insert(_ root: UInt64, _ key: UInt64, _ value: Value) throws(MetadataError) -> (root: UInt64, old: Value?) {
        var old: Value?
        switch try insert(at: root, key, value, &old) {
        case .single(let r):
            return (r, old)
        case .split(let left, let right, let rightKey):
            let leftNode = try node(left)
            let newRoot = try tm.newBlock(as: .btreeNode)
            BTreeNode.initialize(newRoot, leaf: false, valueSize: 8)
            BTreeNode.setCount(newRoot, 2)
            BTreeNode.setKey(newRoot, 0, BTreeNode.key(leftNode, 0))
            BTreeNode.setChild(newRoot, 0, left)
            BTreeNode.setKey(newRoot, 1, rightKey)
            BTreeNode.setChild(newRoot, 1, right)
            return (newRoot.location, old)
        }
    }

    private func insert(at location: UInt64, _ key: UInt64, _ value: Value, _ old: inout Value?) throws(MetadataError) -> Insertion {
        let n = try shadow(location)
        var i = BTreeNode.lowerBound(n, key)
        if BTreeNode.isLeaf(n) {
            if i >= 0 && BTreeNode.key(n, i) == key {
                let offset = BTreeNode.valueOffset(n, i)
                old = Value(loadingFrom: n, at: offset)
                value.store(into: n, at: offset)
                return .single(n.location)
            }
            return try insertEntry(n, at: i + 1, key) { value.store(into: $0, at: $1) }
        }
        if i < 0 {
            // The new key is below every key: it becomes the first child's bound.
            BTreeNode.setKey(n, 0, key)
            i = 0
        }
        switch try insert(at: child(n, i), key, value, &old) {
        case .single(let child):
            BTreeNode.setChild(n, i, child)
            return .single(n.location)
        case .split(let left, let right, let rightKey):
            BTreeNode.setChild(n, i, left)
            return try insertEntry(n, at: i + 1, rightKey) { $0.setU64($1, right) }
        }
    }

    /// Inserts an entry at index `i` of a writable node, splitting it in two when full.
    private func insertEntry(_ n: MetadataBlock, at i: Int, _ key: UInt64,
                             _ store: (MetadataBlock, Int) -> Void) throws(MetadataError) -> Insertion {
        let c = BTreeNode.count(n)
        if c < BTreeNode.maxEntries(n) {
            BTreeNode.openGap(n, at: i)
            BTreeNode.setKey(n, i, key)
            store(n, BTreeNode.valueOffset(n, i))
            return .single(n.location)
        }
        // Full: move the upper half into a new right sibling. Both halves
        // then hold at least max/2 entries, above the max/3 minimum.
        let right = try tm.newBlock(as: .btreeNode)
        BTreeNode.initialize(right, leaf: BTreeNode.isLeaf(n), valueSize: BTreeNode.valueSize(n))
        let half = c / 2
        BTreeNode.copyEntries(from: n, half, to: right, 0, length: c - half)
        BTreeNode.setCount(right, c - half)
        BTreeNode.setCount(n, half)
        let target = i <= half ? n : right
        let j = i <= half ? i : i - half
        BTreeNode.openGap(target, at: j)
        BTreeNode.setKey(target, j, key)
        store(target, BTreeNode.valueOffset(target, j))
        return .split(left: n.location, right: right.location, rightKey: BTreeNode.key(right, 0))
    }

    // MARK: Remove

    /// Removes `key` if present. Returns the new root and the removed value.
    public func remove(_ root: UInt64, _ key: UInt64) throws(MetadataError) -> (root: UInt64, old: Value?) {
        // Look first, so that removing a missing key shadows nothing.
        guard try lookup(root, key) != nil else { return (root, nil) }
        var old: Value?
        var newRoot = try remove(at: root, key, &old)
        // An internal root left with one child hands the tree to that child.
        while true {
            let n = try node(newRoot)
            guard !BTreeNode.isLeaf(n), BTreeNode.count(n) == 1 else { break }
            let only = try child(n, 0)
            try tm.dec(newRoot)   // the root was shadowed, so it is ours alone; its child reference moves up
            newRoot = only
        }
        return (newRoot, old)
    }

    private func remove(at location: UInt64, _ key: UInt64, _ old: inout Value?) throws(MetadataError) -> UInt64 {
        let n = try shadow(location)
        let i = BTreeNode.lowerBound(n, key)
        if BTreeNode.isLeaf(n) {
            // `remove` looked the key up first along this same path, so only a node
            // that changed under us (damage, or a block shared in a cycle) misses it.
            guard i >= 0 && BTreeNode.key(n, i) == key else {
                throw .inconsistent(block: n.location, tree: name, reason: "key \(key), found by lookup, is missing on removal")
            }
            old = Value(loadingFrom: n, at: BTreeNode.valueOffset(n, i))
            BTreeNode.removeEntry(n, at: i)
            return n.location
        }
        guard i >= 0 else {
            throw .inconsistent(block: n.location, tree: name, reason: "key \(key), found by lookup, is below every key on removal")
        }
        let child = try remove(at: child(n, i), key, &old)
        BTreeNode.setChild(n, i, child)
        let childNode = try node(child)
        if BTreeNode.count(childNode) < BTreeNode.maxEntries(childNode) / 3 && BTreeNode.count(n) > 1 {
            try rebalance(n, child: i)
        }
        return n.location
    }

    /// Restores the max/3 minimum of child `i` by merging it with a sibling, or
    /// by moving entries across when the two would not fit in one node.
    private func rebalance(_ parent: MetadataBlock, child i: Int) throws(MetadataError) {
        let j = i + 1 < BTreeNode.count(parent) ? i + 1 : i - 1
        let li = min(i, j)
        let ri = max(i, j)
        let left = try shadow(child(parent, li))
        let right = try shadow(child(parent, ri))
        BTreeNode.setChild(parent, li, left.location)
        BTreeNode.setChild(parent, ri, right.location)
        let nl = BTreeNode.count(left)
        let nr = BTreeNode.count(right)
        let max = BTreeNode.maxEntries(left)
        if nl + nr <= max {
            BTreeNode.copyEntries(from: right, 0, to: left, nl, length: nr)
            BTreeNode.setCount(left, nl + nr)
            BTreeNode.removeEntry(parent, at: ri)
            try tm.dec(right.location)   // its children now belong to `left`
            return
        }
        let target = (nl + nr) / 2
        if nl < target {
            let move = target - nl
            BTreeNode.copyEntries(from: right, 0, to: left, nl, length: move)
            BTreeNode.setCount(left, target)
            BTreeNode.shiftDown(right, by: move)
            BTreeNode.setCount(right, nr - move)
        } else if nl > target {
            let move = nl - target
            BTreeNode.shiftUp(right, by: move)
            BTreeNode.copyEntries(from: left, target, to: right, 0, length: move)
            BTreeNode.setCount(right, nr + move)
            BTreeNode.setCount(left, target)
        }
        BTreeNode.setKey(parent, ri, BTreeNode.key(right, 0))
    }

    // MARK: Delete

    /// Drops the caller's reference to a whole tree (dm_btree_del).
    public func delete(_ root: UInt64) throws(MetadataError) {
        guard root < tm.sm.nrBlocks else {
            throw .inconsistent(block: root, tree: name, reason: "a subtree root beyond the metadata device of \(tm.sm.nrBlocks) blocks")
        }
        if tm.refCount(root) > 1 {
            try tm.dec(root)
            return
        }
        let n = try node(root)
        let c = BTreeNode.count(n)
        if BTreeNode.isLeaf(n) {
            if let decValue {
                for i in 0..<c { try decValue(Value(loadingFrom: n, at: BTreeNode.valueOffset(n, i))) }
            }
        } else {
            for i in 0..<c { try delete(child(n, i)) }
        }
        try tm.dec(root)
    }
}
