import Foundation
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSFUSE
#if canImport(Glibc)
import Glibc
#endif

/// Who may enter a mount and whether it is suid,dev (`MountAccess`), decided from facts that the
/// tests set: no mount needed.
@Suite("Mount access")
struct MountAccessTests {
    typealias Context = MountAccess.Context

    @Test func decisions() {
        let root = Context(privileged: true, userAllowOther: false, underRootOnlyDirectory: true)
        let rootExposed = Context(privileged: true, userAllowOther: false, underRootOnlyDirectory: false)
        let user = Context(privileged: false, userAllowOther: false, underRootOnlyDirectory: true)
        let userAllowed = Context(privileged: false, userAllowOther: true, underRootOnlyDirectory: true)
        // Each case: the context, whether the mount asks for allow_other and for suid,dev, the
        // explicit options; then allow_other, suid,dev, and a word each warning must contain.
        let cases: [(Context, Bool, Bool, [String], Bool, Bool, [String])] = [
            (root, true, true, [], true, true, []),                                  // a container under a root-only directory
            (rootExposed, true, true, [], true, false, ["nosuid,nodev"]),            // other users could reach it
            (rootExposed, true, true, ["suid", "dev"], true, false, []),             // asked for: passed on as given
            (root, true, true, ["nosuid"], true, false, []),                         // refused explicitly
            (rootExposed, true, false, [], true, false, []),                         // not a container (resize, tests)
            (user, true, true, [], false, false, ["user_allow_other"]),              // rootless, no user_allow_other
            (userAllowed, true, true, [], true, false, []),                          // rootless with it: never suid,dev
            (user, false, false, [], false, false, []),                              // owner-only asked for: no warning
        ]
        for (i, (context, allowOther, setuid, options, wantAllowOther, wantSetuid, words)) in cases.enumerated() {
            let a = MountAccess.decide(mountpoint: "/m", allowOther: allowOther, setuidAndDevices: setuid, options: options, context: context)
            #expect(a.allowOther == wantAllowOther && a.setuidAndDevices == wantSetuid, "case \(i): \(a)")
            #expect(a.warnings.count == words.count, "case \(i): \(a.warnings)")
            for (w, word) in zip(a.warnings, words) { #expect(w.contains(word) && w.contains("/m"), "case \(i): \(w)") }
        }
    }

    @Test func fuseConfiguration() {
        // Each case: /etc/fuse.conf's text, and whether fusermount3 would grant allow_other.
        let cases: [(String, Bool)] = [
            ("", false),
            ("#user_allow_other\n", false),                                  // Debian's default: commented out
            ("user_allow_other\n", true),
            ("  user_allow_other \t# allow it\n", true),                    // blanks and a comment around it
            ("mount_max = 1000\nuser_allow_other", true),                    // with other settings, no final newline
            ("user_allow_other_extra\n", false),                             // not the option
            ("# user_allow_other is off\nmount_max = 10\n", false),
        ]
        for (text, granted) in cases { #expect(MountAccess.userAllowOther(inConfiguration: text) == granted, "\(text.debugDescription)") }
    }

    /// The rule Docker's layout follows: some directory above the mount point is root's and closed
    /// to others. Built in /tmp (1777, under / 0755) so that TMPDIR's own parents do not count.
    @Test(.enabled(if: Host.isRoot, "needs root: the directories are chowned"))
    func rootOnlyDirectories() throws {
        var template = Array("/tmp/thinfs-access-XXXXXX".utf8CString)
        let base = try #require(mkdtemp(&template).map { String(cString: $0) })
        defer { try? FileManager.default.removeItem(atPath: base) }
        // Each case: a directory under `base`, its mode and owner, and whether a mount point
        // two levels below it (in a 0755 directory) is shielded.
        let cases: [(String, mode_t, uid_t, gid_t, Bool)] = [
            ("open", 0o755, 0, 0, false),           // everyone may search it
            ("private", 0o700, 0, 0, true),         // Docker's devicemapper/mnt
            ("docker", 0o710, 0, 0, true),          // /var/lib/docker: root's group may search
            ("group", 0o710, 0, 1234, false),       // another group may search
            ("world-x", 0o701, 0, 0, false),        // others may search
            ("users", 0o700, 1000, 1000, false),    // a user's own directory: that user gets in
        ]
        chmod(base, 0o755)
        #expect(!MountAccess.isUnderRootOnlyDirectory(base + "/mp"), "/tmp and / let everyone search")
        for (name, mode, uid, gid, shielded) in cases {
            let dir = base + "/" + name
            try FileManager.default.createDirectory(atPath: dir + "/sub/mp", withIntermediateDirectories: true)
            #expect(chown(dir, uid, gid) == 0 && chmod(dir, mode) == 0 && chmod(dir + "/sub", 0o755) == 0)
            #expect(MountAccess.isUnderRootOnlyDirectory(dir + "/sub/mp") == shielded, "\(name)")
            // The mount point itself does not count: a mount covers its mode.
            #expect(!MountAccess.isUnderRootOnlyDirectory(dir), "\(name) itself")
        }
    }
}
