import Foundation
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

/// Who may use a FUSE mount of a layer or thin device, and whether its set-user-ID bits and
/// device nodes work: one decision for every path that mounts one (`thinfs mount` and the
/// daemon, `thinfs-mount`, the mount helper). Kernel-mount mode is the kernel's ext4, which
/// lets everyone in and mounts `suid,dev` unless told otherwise, as Docker's devicemapper did.
///
/// **Every user may enter** (FUSE's `allow_other`), and the kernel checks the mode bits
/// (`default_permissions`, always on). Without `allow_other` the kernel lets only the mounting
/// user into a FUSE mount, whatever the mode bits say, so every process of a container that drops
/// root (apt's `_apt`, a daemon's own user) gets EACCES. A process that is not root gets
/// `allow_other` from fusermount3 only with `user_allow_other` in /etc/fuse.conf; without it the
/// mount is made for its owner alone, with a warning that names the remedy (a rootless store's
/// containers still work for processes that stay the owner's uid).
///
/// **Set-user-ID and devices (`suid,dev`)**, as on the overlayfs or ext4 mount Docker gives a
/// container, so that sudo, su and passwd work and a device node made in the container opens.
/// Docker keeps host users away from a container's set-user-ID-root programs by mounting under a
/// root-only directory (/var/lib/docker is 0710 root:root). The mount point is the caller's choice
/// here, so the same rule is checked: `suid,dev` when a directory above the mount point is root's
/// and closed to others, `nosuid,nodev` with a warning otherwise. Options given explicitly
/// (`suid`, `nosuid`, `dev`, `nodev`) win. Only root gets them: fusermount3 ignores both for
/// anyone else.
public struct MountAccess: Equatable, Sendable {
    /// `allow_other`: every uid may enter, subject to the mode bits.
    public var allowOther: Bool
    /// `suid` and `dev` (without them, libfuse mounts `nosuid,nodev`).
    public var setuidAndDevices: Bool
    /// Why the mount gives less than asked for, with the remedy: for the person who mounted.
    public var warnings: [String]

    /// What decides: facts about this process and the mount point.
    public struct Context: Equatable, Sendable {
        /// Effective uid 0: mount(2) directly, any option.
        public var privileged: Bool
        /// /etc/fuse.conf has `user_allow_other` (what fusermount3 needs to grant `allow_other`).
        public var userAllowOther: Bool
        /// A directory above the mount point keeps other users out (`isUnderRootOnlyDirectory`).
        public var underRootOnlyDirectory: Bool

        public init(privileged: Bool, userAllowOther: Bool, underRootOnlyDirectory: Bool) {
            self.privileged = privileged
            self.userAllowOther = userAllowOther
            self.underRootOnlyDirectory = underRootOnlyDirectory
        }

        /// This process, mounting at `mountpoint` (canonical: symlinks resolved).
        public static func current(mountpoint: String) -> Context {
            Context(privileged: geteuid() == 0, userAllowOther: MountAccess.userAllowOther(),
                    underRootOnlyDirectory: MountAccess.isUnderRootOnlyDirectory(mountpoint))
        }
    }

    /// The mount options that decide set-user-ID and device handling; a caller that gives any of
    /// them has decided itself.
    public static let setuidAndDeviceOptions: Set = ["suid", "nosuid", "dev", "nodev"]

    /// Decides for a mount at `mountpoint` that wants `allowOther` and, if `setuidAndDevices`,
    /// `suid,dev` where it is safe; `options` are the caller's explicit mount options.
    public static func decide(mountpoint: String, allowOther: Bool, setuidAndDevices: Bool, options: [String],
                              context: Context) -> MountAccess {
        var access = MountAccess(allowOther: allowOther, setuidAndDevices: false, warnings: [])
        if allowOther && !context.privileged && !context.userAllowOther {
            access.allowOther = false
            access.warnings.append("\(mountpoint) is mounted for the user who mounted it alone: other users, such as the ones a container's processes switch to, get 'Permission denied'. Mounting without root, allow_other needs the line 'user_allow_other' in /etc/fuse.conf; add it (as root) and mount again")
        }
        let explicit = !setuidAndDeviceOptions.isDisjoint(with: options)
        if setuidAndDevices && context.privileged && !explicit {
            if context.underRootOnlyDirectory {
                access.setuidAndDevices = true
            } else {
                access.warnings.append("\(mountpoint) is mounted nosuid,nodev: no root-only directory lies above it, so any host user could run the container's set-user-ID programs or open its device nodes there. Mount under a directory only root can enter (such as one made with 'mkdir -m 0700') to have suid,dev, as Docker mounts under /var/lib/docker; or pass -o suid,dev to accept that")
            }
        }
        return access
    }

    /// Whether a directory above `path` (not `path` itself, which a mount covers) keeps every
    /// user but root out: owned by root, with no search permission for others, nor for its group
    /// unless that is root's group. Docker's /var/lib/docker is 0710 root:root. The mode bits
    /// decide; POSIX ACLs on the directory are not read.
    public static func isUnderRootOnlyDirectory(_ path: String) -> Bool {
        var dir = (path as NSString).deletingLastPathComponent
        while !dir.isEmpty {
            var st = stat()
            if stat(dir, &st) == 0, st.st_uid == 0, st.st_mode & 0o001 == 0, st.st_mode & 0o010 == 0 || st.st_gid == 0 {
                return true
            }
            if dir == "/" { break }
            dir = (dir as NSString).deletingLastPathComponent
        }
        return false
    }

    /// Whether /etc/fuse.conf grants `allow_other` to users other than root.
    public static func userAllowOther(configuration path: String = "/etc/fuse.conf") -> Bool {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return false }
        return userAllowOther(inConfiguration: text)
    }

    /// fusermount3's reading of fuse.conf: a `#` starts a comment, blanks around a line are
    /// dropped, and the option is a line of its own.
    static func userAllowOther(inConfiguration text: String) -> Bool {
        text.split(separator: "\n", omittingEmptySubsequences: true).contains { line in
            line.prefix(while: { $0 != "#" }).trimmingCharacters(in: .whitespaces) == "user_allow_other"
        }
    }
}
