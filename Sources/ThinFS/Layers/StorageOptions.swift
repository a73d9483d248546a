import Foundation

/// The `--storage-opt` keys, with Docker's devicemapper names and defaults
/// (moby daemon/graphdriver/devmapper/deviceset.go, `NewDeviceSet`), so a devicemapper
/// user's daemon.json options carry over. Unknown keys are an error, as in Docker.
///
/// Which engine drives the pool (`poolBackend`):
///
///     dm.thinpooldev=NAME      an existing kernel thin pool (direct-lvm: 'thinfs setup-lvm')
///     thinfs.backend=loop      ROOT/pool/{data,metadata} on loop devices, the kernel's dm-thin (loop-lvm)
///     thinfs.backend=rbd       images in a Ceph RBD pool (RBDPool): rbd.pool=NAME (default rbd),
///                              rbd.conf=PATH (a ceph.conf; default librados's search), rbd.id=NAME
///                              (client name without 'client.'; default admin), rbd.prefix=P (image
///                              names P<id>, so stores can share a pool; default thinfs-),
///                              rbd.catalogue=NAME (the RADOS object of a layer catalogue: stores
///                              on several hosts with the same one share image layers; default none),
///                              rbd.osd_timeout=S, rbd.mon_timeout=S (seconds before I/O, and a
///                              monitor command or connection, fail with EIO when the cluster does
///                              not answer; defaults 30 and 15)
///     (neither)                ROOT/pool/{data,metadata}, the userspace engine (ThinFS's default)
///
/// The loop and userspace backends use the same files in the same (dm-thin) format.
public struct StorageOptions: Codable, Equatable, Sendable {
    public enum Backend: String, Codable, Sendable, CaseIterable {
        case userspace, loop, kernel, rbd
    }

    public var baseSize: UInt64 = 10 << 30           // dm.basesize
    public var loopDataSize: UInt64 = 100 << 30      // dm.loopdatasize
    public var loopMetadataSize: UInt64 = 2 << 30    // dm.loopmetadatasize
    public var blockSize: UInt64 = 64 << 10          // dm.blocksize
    public var thinPoolDevice: String?               // dm.thinpooldev
    public var filesystem: String = "ext4"           // dm.fs
    public var mkfsArguments: [String] = []          // dm.mkfsarg (repeatable)
    public var mountOptions: [String] = []           // dm.mountopt
    public var deferredRemoval = false               // dm.use_deferred_removal
    public var deferredDeletion = false              // dm.use_deferred_deletion
    public var minFreeSpacePercent: UInt64 = 10      // dm.min_free_space
    /// thinfs.backend; nil in stores made before the option existed (the userspace engine).
    public var backend: Backend?
    public var rbdPool: String?                      // rbd.pool
    public var rbdConf: String?                      // rbd.conf
    public var rbdID: String?                        // rbd.id
    public var rbdPrefix: String?                    // rbd.prefix
    public var rbdCatalogue: String?                 // rbd.catalogue
    public var rbdOSDTimeout: UInt32?                // rbd.osd_timeout
    public var rbdMonTimeout: UInt32?                // rbd.mon_timeout

    /// The RBD pool these options name (thinfs.backend=rbd).
    public var rbdConfiguration: RBDPool.Configuration {
        RBDPool.Configuration(pool: rbdPool ?? "rbd", conf: rbdConf, clientID: rbdID, prefix: rbdPrefix ?? "thinfs-",
                              imageSize: baseSize, blockSize: blockSize, catalogue: rbdCatalogue,
                              osdTimeout: rbdOSDTimeout ?? RBDPool.Configuration.defaultOSDTimeout,
                              monTimeout: rbdMonTimeout ?? RBDPool.Configuration.defaultMonTimeout)
    }

    /// The engine that drives the pool (see the table above).
    public var poolBackend: Backend { thinPoolDevice != nil ? .kernel : backend ?? .userspace }

    public init() {}

    public struct Error: Swift.Error, CustomStringConvertible, Equatable {
        public var option: String
        public var reason: String
        public var description: String { "storage option \(option): \(reason)" }
    }

    /// The keys Docker's devicemapper driver knew that ThinFS accepts.
    public static let keys = [
        "dm.basesize", "dm.loopdatasize", "dm.loopmetadatasize", "dm.blocksize", "dm.thinpooldev", "dm.fs",
        "dm.mkfsarg", "dm.mountopt", "dm.use_deferred_removal", "dm.use_deferred_deletion", "dm.min_free_space",
        "thinfs.backend", "rbd.pool", "rbd.conf", "rbd.id", "rbd.prefix", "rbd.catalogue",
        "rbd.osd_timeout", "rbd.mon_timeout",
    ]

    /// Applies `KEY=VAL` options in order over the defaults.
    public init(parsing options: [String]) throws(Error) {
        self.init()
        for option in options { try apply(option) }
        if let device = thinPoolDevice, let backend, backend != .kernel {
            throw Error(option: "thinfs.backend", reason: "'\(backend.rawValue)' contradicts dm.thinpooldev=\(device), which names a kernel pool")
        }
        if backend != .rbd, let key = [("rbd.pool", rbdPool), ("rbd.conf", rbdConf), ("rbd.id", rbdID), ("rbd.prefix", rbdPrefix), ("rbd.catalogue", rbdCatalogue),
                                         ("rbd.osd_timeout", rbdOSDTimeout.map { "\($0)" }), ("rbd.mon_timeout", rbdMonTimeout.map { "\($0)" })].first(where: { $0.1 != nil })?.0 {
            throw Error(option: key, reason: "applies to thinfs.backend=rbd only")
        }
        if backend == .kernel, thinPoolDevice == nil {
            throw Error(option: "thinfs.backend", reason: "'kernel' needs dm.thinpooldev=NAME, the kernel thin pool to use")
        }
    }

    public mutating func apply(_ option: String) throws(Error) {
        guard let eq = option.firstIndex(of: "=") else {
            throw Error(option: option, reason: "expected KEY=VALUE")
        }
        let key = option[..<eq].lowercased().trimmingCharacters(in: .whitespaces)
        let value = String(option[option.index(after: eq)...]).trimmingCharacters(in: .whitespaces)
        func size() throws(Error) -> UInt64 {
            guard let v = try? ByteSize.parse(value), v > 0 else {
                throw Error(option: key, reason: "'\(value)' is not a size (examples: 10G, 512M, 64K)")
            }
            return v
        }
        func bool() throws(Error) -> Bool {
            switch value.lowercased() {
            case "true", "1", "yes": return true
            case "false", "0", "no": return false
            default: throw Error(option: key, reason: "'\(value)' is not a boolean (true or false)")
            }
        }
        switch key {
        case "dm.basesize":
            let v = try size()
            guard v >= 1 << 20, v % 4096 == 0 else { throw Error(option: key, reason: "\(value) must be at least 1M and a multiple of 4K") }
            baseSize = v
        case "dm.loopdatasize": loopDataSize = try size()
        case "dm.loopmetadatasize": loopMetadataSize = try size()
        case "dm.blocksize":
            let v = try size()
            // dm-thin: a multiple of 64K between 64K and 1G (thin-provisioning.rst).
            guard v % (64 << 10) == 0, v >= 64 << 10, v <= 1 << 30 else {
                throw Error(option: key, reason: "\(value) must be a multiple of 64K between 64K and 1G")
            }
            blockSize = v
        case "dm.thinpooldev":
            let name = value.hasPrefix("/dev/mapper/") ? String(value.dropFirst("/dev/mapper/".count)) : value
            guard !name.isEmpty, !name.contains("/") else {
                throw Error(option: key, reason: "'\(value)' is not a device-mapper name (NAME or /dev/mapper/NAME)")
            }
            thinPoolDevice = name
        case "thinfs.backend":
            guard let b = Backend(rawValue: value.lowercased()) else {
                throw Error(option: key, reason: "'\(value)' is not one of \(Backend.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            backend = b
        case "rbd.pool", "rbd.id", "rbd.prefix", "rbd.catalogue":
            // Ceph's names: no '/' (pool/image separator) or '@' (image@snapshot).
            guard !value.isEmpty, !value.contains("/"), !value.contains("@"), !value.contains("\0") else {
                throw Error(option: key, reason: "'\(value)' must be a non-empty name without '/' or '@'")
            }
            switch key {
            case "rbd.pool": rbdPool = value
            case "rbd.id": rbdID = value.hasPrefix("client.") ? String(value.dropFirst(7)) : value
            case "rbd.catalogue": rbdCatalogue = value
            default: rbdPrefix = value
            }
        case "rbd.osd_timeout", "rbd.mon_timeout":
            // 0 would be Ceph's "wait for ever": the hang these options exist to prevent.
            guard let seconds = UInt32(value), seconds > 0, seconds <= 3600 else {
                throw Error(option: key, reason: "'\(value)' must be a number of seconds from 1 to 3600")
            }
            if key == "rbd.osd_timeout" { rbdOSDTimeout = seconds } else { rbdMonTimeout = seconds }
        case "rbd.conf":
            guard value.hasPrefix("/"), !value.contains("\0") else {
                throw Error(option: key, reason: "'\(value)' must be an absolute path to a ceph.conf")
            }
            rbdConf = value
        case "dm.fs":
            switch value {
            case "ext4": filesystem = value
            case "xfs": throw Error(option: key, reason: "xfs is not supported yet: the FUSE server reads ext4 through libext2fs (xfs may come later); use ext4")
            default: throw Error(option: key, reason: "unknown filesystem '\(value)'; ThinFS supports ext4")
            }
        case "dm.mkfsarg": mkfsArguments.append(value)
        case "dm.mountopt": mountOptions += value.split(separator: ",").map(String.init)
        case "dm.use_deferred_removal": deferredRemoval = try bool()
        case "dm.use_deferred_deletion": deferredDeletion = try bool()
        case "dm.min_free_space":
            let digits = value.hasSuffix("%") ? String(value.dropLast()) : value
            guard let v = UInt64(digits), v < 100 else {
                throw Error(option: key, reason: "'\(value)' must be a percentage from 0% to 99%")
            }
            minFreeSpacePercent = v
        default:
            throw Error(option: key, reason: "unknown option; the known ones are \(Self.keys.joined(separator: ", "))")
        }
    }
}

extension StorageOptions {
    /// The value of `key` in these options, as an error message shows it.
    func shown(_ key: String) -> String {
        switch key {
        case "dm.basesize": ByteSize.format(baseSize)
        case "dm.loopdatasize": ByteSize.format(loopDataSize)
        case "dm.loopmetadatasize": ByteSize.format(loopMetadataSize)
        case "dm.blocksize": ByteSize.format(blockSize)
        case "dm.thinpooldev": thinPoolDevice ?? "(none)"
        case "thinfs.backend": poolBackend.rawValue
        case "rbd.pool": rbdPool ?? "(none)"
        case "rbd.conf": rbdConf ?? "(none)"
        case "rbd.id": rbdID ?? "(none)"
        case "rbd.prefix": rbdPrefix ?? "(none)"
        case "rbd.catalogue": rbdCatalogue ?? "(none)"
        case "rbd.osd_timeout": "\(rbdOSDTimeout ?? RBDPool.Configuration.defaultOSDTimeout)"
        case "rbd.mon_timeout": "\(rbdMonTimeout ?? RBDPool.Configuration.defaultMonTimeout)"
        case "dm.fs": filesystem
        case "dm.mkfsarg": mkfsArguments.isEmpty ? "(none)" : mkfsArguments.joined(separator: " ")
        case "dm.mountopt": mountOptions.isEmpty ? "(none)" : mountOptions.joined(separator: ",")
        case "dm.use_deferred_removal": String(deferredRemoval)
        case "dm.use_deferred_deletion": String(deferredDeletion)
        case "dm.min_free_space": "\(minFreeSpacePercent)%"
        default: "?"
        }
    }

    /// Checks `given` (`KEY=VALUE`, as `thinfs init` takes them) against these options, a
    /// store's stored ones (`thinfs serve` on a root that has a store). A store keeps the
    /// options it was made with: every process that opens it uses them, so one daemon's
    /// start-up options cannot change them. A key given with the stored value is accepted; one
    /// with another value is refused, naming the key and both values, as dockerd refused a
    /// dm.basesize smaller than its base device. Invalid options are refused as by `init`.
    ///
    /// dm.basesize alone may grow, as devicemapper's did: a bigger one is returned, for the
    /// caller to grow the base device with (`LayerStore.growBase`); a smaller one is refused,
    /// naming both sizes.
    @discardableResult
    public func checkUnchanged(by given: [String], root: String) throws(Error) -> UInt64? {
        let parsed = try StorageOptions(parsing: given)
        var keys: [String] = []
        for option in given {
            guard let eq = option.firstIndex(of: "=") else { continue }
            let key = option[..<eq].lowercased().trimmingCharacters(in: .whitespaces)
            if !keys.contains(key) { keys.append(key) }
        }
        var grownBase: UInt64?
        for key in keys where parsed.shown(key) != shown(key) {
            if key == "dm.basesize" {
                guard parsed.baseSize > baseSize else {
                    throw Error(option: key, reason: "the store at \(root) has a base device of \(ByteSize.format(baseSize)) (\(baseSize) bytes); it cannot shrink to \(ByteSize.format(parsed.baseSize)) (\(parsed.baseSize) bytes): the base size only grows")
                }
                grownBase = parsed.baseSize
                continue
            }
            throw Error(option: key, reason: "the store at \(root) was made with \(key)=\(shown(key)); it cannot change to \(parsed.shown(key)) (options are fixed when a store is made: start without it, or make a new store in another root)")
        }
        return grownBase
    }
}
