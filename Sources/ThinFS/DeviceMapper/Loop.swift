import CThinFSShims
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A loop device bound to a backing file, through the kernel's loop ioctls
/// (loop(4)): LOOP_CTL_GET_FREE on /dev/loop-control finds a free device,
/// LOOP_CONFIGURE binds the file (LOOP_SET_FD + LOOP_SET_STATUS64 on kernels
/// before 5.8), LOOP_SET_CAPACITY picks up a grown file, LOOP_CLR_FD unbinds.
///
/// With `autoclear` (LO_FLAGS_AUTOCLEAR) the kernel unbinds the device when
/// its last opener closes it, so a loop device under a dm table goes away with
/// the table and nothing is leaked if the process dies. The object holds the
/// device open until `close()`, so the binding survives until dm has opened it.
public final class LoopDevice: @unchecked Sendable {
    public enum Error: Swift.Error, Sendable, CustomStringConvertible {
        case ioctl(String, path: String, errno: Errno)

        public var description: String {
            switch self {
            case .ioctl(let op, let path, let e):
                "\(op) \(path): \(e)" + (e == .noSuchFileOrDirectory ? "; is the loop module loaded ('modprobe loop')?" : "")
            }
        }
    }

    /// `/dev/loopN`.
    public let path: String
    public let number: Int32
    private var fd: Int32

    private init(path: String, number: Int32, fd: Int32) {
        self.path = path
        self.number = number
        self.fd = fd
    }

    deinit { close() }

    /// Closes this process's handle (with autoclear, the binding ends when dm lets go too).
    public func close() {
        if fd >= 0 { _ = Glibc.close(fd); fd = -1 }
    }

    /// Binds `file` to a free loop device.
    public static func attach(file: String, readOnly: Bool = false, autoclear: Bool = true, directIO: Bool = false) throws -> LoopDevice {
        let backing = open(file, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard backing >= 0 else { throw Error.ioctl("open", path: file, errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(backing) }
        let control = open("/dev/loop-control", O_RDWR | O_CLOEXEC)
        guard control >= 0 else { throw Error.ioctl("open", path: "/dev/loop-control", errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(control) }

        var flags: UInt32 = 0
        if autoclear { flags |= UInt32(LO_FLAGS_AUTOCLEAR) }
        if readOnly { flags |= UInt32(LO_FLAGS_READ_ONLY) }
        if directIO { flags |= UInt32(LO_FLAGS_DIRECT_IO) }

        // Another process may take the free device between GET_FREE and binding it (EBUSY): try the next one.
        for _ in 0..<16 {
            let n = thinfs_ioctl_value(control, UInt(LOOP_CTL_GET_FREE), 0)
            guard n >= 0 else { throw Error.ioctl("LOOP_CTL_GET_FREE", path: "/dev/loop-control", errno: Errno(rawValue: errno)) }
            let path = "/dev/loop\(n)"
            let dev = try openNode(path, number: n, readOnly: readOnly)
            var config = loop_config()
            config.fd = UInt32(backing)
            config.info.lo_flags = flags
            withUnsafeMutableBytes(of: &config.info.lo_file_name) { name in
                let bytes = Array(file.utf8.prefix(name.count - 1))
                name.copyBytes(from: bytes)
            }
            if thinfs_ioctl_pointer(dev, UInt(LOOP_CONFIGURE), &config) == 0 {
                return LoopDevice(path: path, number: n, fd: dev)
            }
            var e = errno
            if e == EINVAL || e == ENOTTY {
                // Before Linux 5.8: bind, then set the flags.
                if thinfs_ioctl_value(dev, UInt(LOOP_SET_FD), UInt(backing)) == 0 {
                    if thinfs_ioctl_pointer(dev, UInt(LOOP_SET_STATUS64), &config.info) == 0 {
                        return LoopDevice(path: path, number: n, fd: dev)
                    }
                    e = errno
                    _ = thinfs_ioctl_value(dev, UInt(LOOP_CLR_FD), 0)
                } else {
                    e = errno
                }
            }
            _ = Glibc.close(dev)
            guard e == EBUSY else { throw Error.ioctl("LOOP_CONFIGURE", path: path, errno: Errno(rawValue: e)) }
        }
        throw Error.ioctl("LOOP_CONFIGURE", path: "/dev/loop*", errno: .resourceBusy)
    }

    /// Opens `/dev/loopN`, making the node first where nothing made it (no devtmpfs, no udev).
    private static func openNode(_ path: String, number: Int32, readOnly: Bool) throws -> Int32 {
        var fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        if fd < 0 && errno == ENOENT {
            // Loop devices are block major 7; minor = number (no partitions).
            // glibc's makedev (a macro Swift cannot see): major in bits 8-19, minor in 0-7 and 20-31.
            let minor = UInt64(number)
            _ = mknod(path, S_IFBLK | 0o660, dev_t((7 << 8) | (minor & 0xff) | ((minor & ~0xff) << 12)))
            fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        }
        guard fd >= 0 else { throw Error.ioctl("open", path: path, errno: Errno(rawValue: errno)) }
        return fd
    }

    /// Makes the loop device's size follow its grown backing file.
    public static func setCapacity(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Error.ioctl("open", path: path, errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(fd) }
        if thinfs_ioctl_value(fd, UInt(LOOP_SET_CAPACITY), 0) != 0 {
            throw Error.ioctl("LOOP_SET_CAPACITY", path: path, errno: Errno(rawValue: errno))
        }
    }

    /// Unbinds a loop device now (without autoclear, or to clean up after a failure).
    public static func detach(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Error.ioctl("open", path: path, errno: Errno(rawValue: errno)) }
        defer { _ = Glibc.close(fd) }
        if thinfs_ioctl_value(fd, UInt(LOOP_CLR_FD), 0) != 0 {
            throw Error.ioctl("LOOP_CLR_FD", path: path, errno: Errno(rawValue: errno))
        }
    }
}
