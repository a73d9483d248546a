import ArgumentParser
import Foundation
import ThinFS

/// `thinfs setup-lvm`: the direct-lvm procedure of Docker's devicemapper
/// documentation, automated as Docker's `dm.directlvm_device` did, with lvm2's
/// own tools.
struct SetupLVMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "setup-lvm",
        abstract: "Turn a block device into an LVM thin pool monitored by dmeventd (Docker's direct-lvm setup).",
        discussion: """
        Runs pvcreate, vgcreate, two lvcreate (data and metadata), lvconvert into a thin pool, writes the
        autoextend profile /etc/lvm/profile/VG-THINPOOL.profile, attaches it with lvchange, and checks that
        'lvs -o+seg_monitor' says monitored. Prints the storage option to use: dm.thinpooldev=/dev/mapper/VG-THINPOOL.
        A device holding a filesystem or belonging to a volume group is refused unless --force.
        """
    )

    @Option(help: "The block device to give to LVM (all its data is lost).") var device: String
    @Option(help: "Volume group name.") var vg = "docker"
    @Option(help: "Thin pool LV name.") var thinpool = "thinpool"
    @Option(name: .customLong("data-percent"), help: "Data LV size in % of the VG.") var dataPercent = 95
    @Option(name: .customLong("meta-percent"), help: "Metadata LV size in % of the VG.") var metaPercent = 1
    @Option(name: .customLong("autoextend-threshold"), help: "Extend the pool when it is this % full.") var autoextendThreshold = 80
    @Option(name: .customLong("autoextend-percent"), help: "Extend it by this % each time.") var autoextendPercent = 20
    @Option(name: .customLong("chunk-size"), help: "Pool chunk size, 64K to 1G in multiples of 64K.") var chunkSize = "512K"
    @Flag(help: "Use the device even if it holds a filesystem or belongs to a volume group.") var force = false

    func run() throws {
        Logging.bootstrapOnce(verbose: false)
        let setup = DirectLVMSetup(device: device, vg: vg, thinpool: thinpool, dataPercent: dataPercent, metaPercent: metaPercent,
                                   autoextendThreshold: autoextendThreshold, autoextendPercent: autoextendPercent,
                                   chunkSize: chunkSize, force: force)
        let option = try setup.run(on: HostSystem())
        print(option)
    }
}

/// What `DirectLVMSetup` needs from the machine, so that tests can check the
/// exact command sequence without LVM or a disk.
public protocol LVMSystem {
    /// Runs a command (argv[0] looked up on PATH) and returns its status and output.
    func run(_ argv: [String]) throws -> CommandResult
    func isBlockDevice(_ path: String) -> Bool
    func writeFile(_ path: String, contents: String) throws
}

public struct CommandResult: Equatable, Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public init(status: Int32 = 0, stdout: String = "", stderr: String = "") {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// The real machine: Foundation's Process, stat, and files.
public struct HostSystem: LVMSystem {
    public init() {}

    /// posix_spawn with stdin from /dev/null and both outputs read through poll(2). Not Foundation's
    /// Process: it needs a CFSocket wakeup socket pair, which the test guest's kernel refuses, and then hangs.
    public func run(_ argv: [String]) throws -> CommandResult {
        let path = try Self.lookUp(argv[0])
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        guard pipe(&out) == 0 else { throw DirectLVMSetup.Error.invalid("pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&err) == 0 else {
            close(out[0]); close(out[1])
            throw DirectLVMSetup.Error.invalid("pipe: \(String(cString: strerror(errno)))")
        }
        // Our ends must not leak into the child (it would hold its own pipe open).
        for fd in [out[0], err[0]] { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, out[1], 1)
        posix_spawn_file_actions_adddup2(&actions, err[1], 2)
        posix_spawn_file_actions_addclose(&actions, out[1])
        posix_spawn_file_actions_addclose(&actions, err[1])
        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for a in cArgs { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, cArgs, environ)
        close(out[1]); close(err[1])
        guard rc == 0 else {
            close(out[0]); close(err[0])
            throw DirectLVMSetup.Error.invalid("cannot run \(path): \(String(cString: strerror(rc)))")
        }
        // Drain both pipes together, so a chatty tool cannot fill one and block.
        var fds = [pollfd(fd: out[0], events: Int16(POLLIN), revents: 0), pollfd(fd: err[0], events: Int16(POLLIN), revents: 0)]
        var collected: [[UInt8]] = [[], []]
        var buffer = [UInt8](repeating: 0, count: 65536)
        var open = 2
        while open > 0 {
            if poll(&fds, nfds_t(fds.count), -1) < 0 {
                if errno == EINTR { continue }
                break
            }
            for i in 0..<fds.count where fds[i].fd >= 0 && fds[i].revents != 0 {
                let n = read(fds[i].fd, &buffer, buffer.count)
                if n > 0 {
                    collected[i] += buffer[0..<n]
                } else if n == 0 || errno != EINTR {
                    close(fds[i].fd)
                    fds[i].fd = -1
                    open -= 1
                }
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import (they are macros).
        let exit: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return CommandResult(status: exit, stdout: String(decoding: collected[0], as: UTF8.self),
                             stderr: String(decoding: collected[1], as: UTF8.self))
    }

    /// argv[0] on PATH (plus the sbin directories, where lvm2 lives), as a shell would find it.
    static func lookUp(_ name: String) throws -> String {
        if name.contains("/") { return name }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        let dirs = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/sbin"]
        for dir in dirs where access("\(dir)/\(name)", X_OK) == 0 {
            return "\(dir)/\(name)"
        }
        throw DirectLVMSetup.Error.invalid("\(name) is not installed (lvm2 and util-linux provide the tools setup-lvm runs)")
    }

    public func isBlockDevice(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
    }

    public func writeFile(_ path: String, contents: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try contents.write(toFile: path, atomically: true, encoding: .utf8)
    }
}

/// The direct-lvm procedure, step by step (Docker's "Configure direct-lvm mode manually"):
///
///     pvcreate DEV
///     vgcreate VG DEV
///     lvcreate --yes --wipesignatures y -n THINPOOL VG -l 95%VG
///     lvcreate --yes --wipesignatures y -n THINPOOLmeta VG -l 1%VG
///     lvconvert -y --zero n -c 512K --thinpool VG/THINPOOL --poolmetadata VG/THINPOOLmeta
///     /etc/lvm/profile/VG-THINPOOL.profile: activation { thin_pool_autoextend_threshold=80 thin_pool_autoextend_percent=20 }
///     lvchange --metadataprofile VG-THINPOOL VG/THINPOOL
///     lvs -o+seg_monitor            (must say "monitored")
///
/// `--yes` answers lvcreate's "signature detected ... Wipe it?" prompt, which Docker's guide
/// leaves to the person typing: a disk that held an earlier pool (vgremove'd, then set up again)
/// still carries its thin devices' ext4 superblocks where the new LVs start, and without a
/// terminal lvcreate answers no and aborts. The device itself was checked for signatures first
/// (or `--force` was given), so what lies inside the new LVs is a removed VG's leftovers.
public struct DirectLVMSetup: Sendable {
    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case invalid(String)
        case notABlockDevice(String)
        case hasFilesystem(device: String, type: String)
        case inVolumeGroup(device: String, vg: String)
        case vgExists(String)
        case commandFailed([String], status: Int32, stderr: String)
        case notMonitored(String, found: String)

        public var description: String {
            switch self {
            case .invalid(let s): s
            case .notABlockDevice(let d): "\(d) is not a block device"
            case .hasFilesystem(let d, let t):
                "\(d) holds a filesystem or signature (blkid TYPE=\(t)); its data would be lost: pass --force to use it anyway"
            case .inVolumeGroup(let d, let vg):
                "\(d) belongs to volume group '\(vg)' (pvs); pass --force to take it (vgreduce or vgremove it first to keep that VG intact)"
            case .vgExists(let vg): "volume group '\(vg)' already exists: choose another --vg or remove it (vgremove \(vg))"
            case .commandFailed(let argv, let status, let err):
                "'\(argv.joined(separator: " "))' failed with status \(status)" + (err.isEmpty ? "" : ": \(err.trimmingCharacters(in: .whitespacesAndNewlines))")
            case .notMonitored(let lv, let found):
                "\(lv) is not monitored by dmeventd (seg_monitor '\(found)'), so it will not autoextend: start dmeventd, then 'lvchange --monitor y \(lv)'"
            }
        }
    }

    public var device: String
    public var vg: String
    public var thinpool: String
    public var dataPercent: Int
    public var metaPercent: Int
    public var autoextendThreshold: Int
    public var autoextendPercent: Int
    public var chunkSize: String
    public var force: Bool

    public init(device: String, vg: String = "docker", thinpool: String = "thinpool", dataPercent: Int = 95, metaPercent: Int = 1,
                autoextendThreshold: Int = 80, autoextendPercent: Int = 20, chunkSize: String = "512K", force: Bool = false) {
        self.device = device
        self.vg = vg
        self.thinpool = thinpool
        self.dataPercent = dataPercent
        self.metaPercent = metaPercent
        self.autoextendThreshold = autoextendThreshold
        self.autoextendPercent = autoextendPercent
        self.chunkSize = chunkSize
        self.force = force
    }

    public var profileName: String { "\(vg)-\(thinpool)" }
    public var profilePath: String { "/etc/lvm/profile/\(profileName).profile" }
    public var metadataLV: String { "\(thinpool)meta" }

    /// The pool's dm name: LVM joins VG and LV with '-' and doubles any '-' inside them.
    public var dmName: String { "\(vg.replacingOccurrences(of: "-", with: "--"))-\(thinpool.replacingOccurrences(of: "-", with: "--"))" }
    /// The storage option that points ThinFS (or Docker) at the pool.
    public var storageOption: String { "dm.thinpooldev=/dev/mapper/\(dmName)" }

    public var profile: String {
        """
        activation {
            thin_pool_autoextend_threshold=\(autoextendThreshold)
            thin_pool_autoextend_percent=\(autoextendPercent)
        }

        """
    }

    /// The arguments alone (moby's validateLVMConfig).
    public func validateArguments() throws(Error) {
        guard dataPercent > 0, metaPercent > 0 else { throw .invalid("--data-percent and --meta-percent must be positive") }
        guard dataPercent + metaPercent <= 100 else {
            throw .invalid("--data-percent \(dataPercent) and --meta-percent \(metaPercent) add up to \(dataPercent + metaPercent)%: they must sum to 100 or less")
        }
        guard (1...100).contains(autoextendThreshold) else { throw .invalid("--autoextend-threshold \(autoextendThreshold) must be 1 to 100 (100 turns autoextend off)") }
        guard autoextendPercent > 0 else { throw .invalid("--autoextend-percent must be positive") }
        let nameOK: (String) -> Bool = { !$0.isEmpty && $0.allSatisfy { $0.isLetter || $0.isNumber || "+_.-".contains($0) } && !$0.hasPrefix("-") }
        guard nameOK(vg) else { throw .invalid("--vg '\(vg)': LVM names take letters, digits and + _ . - (not first)") }
        guard nameOK(thinpool) else { throw .invalid("--thinpool '\(thinpool)': LVM names take letters, digits and + _ . - (not first)") }
        guard let chunk = try? ByteSize.parse(chunkSize), chunk >= 64 << 10, chunk <= 1 << 30, chunk % (64 << 10) == 0 else {
            throw .invalid("--chunk-size \(chunkSize): thin pools take 64K to 1G in multiples of 64K")
        }
    }

    /// The device (moby's verifyBlockDevice: no filesystem, not in a VG, unless forced) and the VG name.
    public func validateDevice(on system: LVMSystem) throws {
        guard system.isBlockDevice(device) else { throw Error.notABlockDevice(device) }
        let vgs = try system.run(["vgs", "--noheadings", "-o", "vg_name", vg])
        if vgs.status == 0 { throw Error.vgExists(vg) }
        guard !force else { return }
        let pvs = try system.run(["pvs", "--noheadings", "-o", "vg_name", device])
        if pvs.status == 0 {
            let owner = pvs.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            if !owner.isEmpty { throw Error.inVolumeGroup(device: device, vg: owner) }
        }
        // blkid exits 2 when it finds no signature.
        let blkid = try system.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
        let type = blkid.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        if blkid.status == 0 && !type.isEmpty { throw Error.hasFilesystem(device: device, type: type) }
    }

    /// The commands, in order, that build the pool (the profile is written between lvconvert and lvchange).
    public var commands: [[String]] {
        [
            force ? ["pvcreate", "-ff", "-y", device] : ["pvcreate", device],
            ["vgcreate", vg, device],
            ["lvcreate", "--yes", "--wipesignatures", "y", "-n", thinpool, vg, "-l", "\(dataPercent)%VG"],
            ["lvcreate", "--yes", "--wipesignatures", "y", "-n", metadataLV, vg, "-l", "\(metaPercent)%VG"],
            ["lvconvert", "-y", "--zero", "n", "-c", chunkSize, "--thinpool", "\(vg)/\(thinpool)", "--poolmetadata", "\(vg)/\(metadataLV)"],
        ]
    }

    public var attachProfile: [String] { ["lvchange", "--metadataprofile", profileName, "\(vg)/\(thinpool)"] }
    public var verifyMonitor: [String] { ["lvs", "--noheadings", "-o+seg_monitor", "\(vg)/\(thinpool)"] }

    /// Validates, runs the procedure, verifies monitoring; returns the storage option.
    @discardableResult
    public func run(on system: LVMSystem) throws -> String {
        try validateArguments()
        try validateDevice(on: system)
        func run(_ argv: [String]) throws -> CommandResult {
            let r = try system.run(argv)
            guard r.status == 0 else { throw Error.commandFailed(argv, status: r.status, stderr: r.stderr) }
            return r
        }
        for argv in commands { _ = try run(argv) }
        try system.writeFile(profilePath, contents: profile)
        _ = try run(attachProfile)
        let lvs = try run(verifyMonitor)
        // `lvs -o+seg_monitor` prints the default columns, then the monitor state last ("monitored",
        // "not monitored" or empty).
        let line = lvs.stdout.split(separator: "\n").first.map(String.init) ?? ""
        let state = line.hasSuffix("not monitored") ? "not monitored" : (line.split(separator: " ").last.map(String.init) ?? "")
        guard state == "monitored" else { throw Error.notMonitored("\(vg)/\(thinpool)", found: state) }
        return storageOption
    }
}
