using System.Runtime.InteropServices;

namespace OffloadRpc.Interop;

/// <summary>
/// The facts of the Linux ABI that differ by architecture: system call numbers and the offsets of the
/// kernel/glibc structs this library reads by hand. One table per supported architecture, chosen once;
/// anything else is <see cref="PlatformNotSupportedException"/>, never a guess.
/// </summary>
internal sealed record LinuxAbi(Architecture Architecture, long SysFutex, long SysFutexWaitv, int StatModeOffset, int StatUidOffset, int EpollEventSize, int EpollDataOffset)
{
    /// <summary>
    /// x86-64: futex is syscall 202, futex_waitv 449; struct stat has st_nlink (8 bytes) before st_mode;
    /// struct epoll_event is packed (u32 events, then u64 data at offset 4: 12 bytes).
    /// </summary>
    public static readonly LinuxAbi X64 = new(Architecture.X64, SysFutex: 202, SysFutexWaitv: 449, StatModeOffset: 24, StatUidOffset: 28, EpollEventSize: 12, EpollDataOffset: 4);

    /// <summary>
    /// AArch64 (the generic syscall table): futex is 98, futex_waitv 449; struct stat has st_mode right
    /// after st_ino; struct epoll_event is naturally aligned (data at offset 8: 16 bytes).
    /// </summary>
    public static readonly LinuxAbi Arm64 = new(Architecture.Arm64, SysFutex: 98, SysFutexWaitv: 449, StatModeOffset: 16, StatUidOffset: 24, EpollEventSize: 16, EpollDataOffset: 8);

    private static readonly Lazy<LinuxAbi> s_current = new(() => For(RuntimeInformation.ProcessArchitecture, OperatingSystem.IsLinux()));

    /// <summary>The table of the running process.</summary>
    public static LinuxAbi Current => s_current.Value;

    /// <summary>The table of <paramref name="architecture"/> on Linux.</summary>
    /// <exception cref="PlatformNotSupportedException">Not Linux, or an architecture without a table.</exception>
    public static LinuxAbi For(Architecture architecture, bool isLinux = true)
    {
        if (!isLinux)
        {
            throw new PlatformNotSupportedException("OffloadRpc runs on Linux only (memfd, futex, SCM_RIGHTS).");
        }

        return architecture switch
        {
            Architecture.X64 => X64,
            Architecture.Arm64 => Arm64,
            _ => throw new PlatformNotSupportedException($"OffloadRpc has no system-call table for {architecture}; it supports x86-64 and Arm64."),
        };
    }
}
