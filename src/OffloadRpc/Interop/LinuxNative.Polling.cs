using System.Runtime.InteropServices;

namespace OffloadRpc.Interop;

/// <summary>Waiting on many things with one thread: futex_waitv over many futex words, and epoll over many sockets.</summary>
internal static unsafe partial class LinuxNative
{
    /// <summary>The most words one futex_waitv call takes (FUTEX_WAITV_MAX).</summary>
    public const int FutexWaitvMax = 128;

    private const uint FUTEX2_SIZE_U32 = 0x02;
    private const int CLOCK_MONOTONIC = 1;

    private static readonly long s_sysFutexWaitv = LinuxAbi.Current.SysFutexWaitv;

    /// <summary>struct futex_waitv: the value expected, the word's address, its flags (u32, shared).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct FutexWaiter
    {
        public ulong Value;
        public ulong Address;
        public uint Flags;
        public uint Reserved;

        public static FutexWaiter For(int* word, int expected) =>
            new() { Value = (uint)expected, Address = (ulong)word, Flags = FUTEX2_SIZE_U32 };
    }

    /// <summary>
    /// Sleeps until one of <paramref name="count"/> shared futex words is woken, or one of them no longer
    /// holds its expected value, or <paramref name="timeoutMilliseconds"/> pass (negative: no timeout).
    /// </summary>
    /// <returns>The index of the woken word, or -errno: EAGAIN (a word already differs), ETIMEDOUT, EINTR, ENOSYS (kernel older than 5.16).</returns>
    public static int FutexWaitv(FutexWaiter* waiters, int count, int timeoutMilliseconds)
    {
        long* timespec = null;
        long* deadline = stackalloc long[2];
        if (timeoutMilliseconds >= 0)
        {
            // futex_waitv takes an absolute time on the given clock.
            if (ClockGetTime(CLOCK_MONOTONIC, deadline) != 0)
            {
                return -Marshal.GetLastPInvokeError();
            }

            long nanoseconds = deadline[1] + ((timeoutMilliseconds % 1000) * 1_000_000L);
            deadline[0] += (timeoutMilliseconds / 1000) + (nanoseconds / 1_000_000_000L);
            deadline[1] = nanoseconds % 1_000_000_000L;
            timespec = deadline;
        }

        long result = Syscall6(s_sysFutexWaitv, (nint)waiters, count, 0, (nint)timespec, CLOCK_MONOTONIC, 0);
        return result >= 0 ? (int)result : -Marshal.GetLastPInvokeError();
    }

    [LibraryImport(Libc, EntryPoint = "clock_gettime", SetLastError = true)]
    private static partial int ClockGetTime(int clock, long* timespec);

    // ------------------------------------------------------------------ epoll

    public const int EPOLL_CLOEXEC = 0x80000;
    public const int EPOLL_CTL_ADD = 1;
    public const int EPOLL_CTL_DEL = 2;
    public const int EPOLL_CTL_MOD = 3;
    public const uint EPOLLIN = 0x001;
    public const uint EPOLLOUT = 0x004;
    public const uint EPOLLERR = 0x008;
    public const uint EPOLLHUP = 0x010;
    public const uint EPOLLRDHUP = 0x2000;
    public const uint EPOLLONESHOT = 1u << 30;
    public const uint EPOLLET = 1u << 31;

    public const int EFD_CLOEXEC = 0x80000;
    public const int EFD_NONBLOCK = 0x800;

    [LibraryImport(Libc, EntryPoint = "epoll_create1", SetLastError = true)]
    public static partial int EpollCreate(int flags);

    [LibraryImport(Libc, EntryPoint = "epoll_ctl", SetLastError = true)]
    private static partial int EpollCtlRaw(int epfd, int op, int fd, byte* eventBuffer);

    [LibraryImport(Libc, EntryPoint = "epoll_wait", SetLastError = true)]
    private static partial int EpollWaitRaw(int epfd, byte* events, int maxEvents, int timeoutMilliseconds);

    [LibraryImport(Libc, EntryPoint = "gettid")]
    public static partial int GetTid();

    [LibraryImport(Libc, EntryPoint = "eventfd", SetLastError = true)]
    public static partial int EventFd(uint initial, int flags);

    [LibraryImport(Libc, EntryPoint = "write", SetLastError = true)]
    private static partial nint WriteRaw(int fd, void* buffer, nuint count);

    [LibraryImport(Libc, EntryPoint = "read", SetLastError = true)]
    private static partial nint ReadRaw(int fd, void* buffer, nuint count);

    /// <summary>Adds, changes or removes <paramref name="fd"/> in an epoll set; <paramref name="token"/> comes back with its events.</summary>
    /// <returns>0, or the errno of the failure.</returns>
    public static int EpollControl(int epfd, int op, int fd, uint events, ulong token)
    {
        LinuxAbi abi = LinuxAbi.Current;
        byte* buffer = stackalloc byte[16];
        new Span<byte>(buffer, 16).Clear();
        *(uint*)buffer = events;
        *(ulong*)(buffer + abi.EpollDataOffset) = token;
        return EpollCtlRaw(epfd, op, fd, buffer) == 0 ? 0 : Marshal.GetLastPInvokeError();
    }

    /// <summary>Waits for events; writes each event's flags and token into the spans.</summary>
    /// <returns>How many events arrived, or -errno.</returns>
    public static int EpollWait(int epfd, Span<uint> events, Span<ulong> tokens, int timeoutMilliseconds)
    {
        LinuxAbi abi = LinuxAbi.Current;
        int max = Math.Min(events.Length, tokens.Length);
        byte* buffer = stackalloc byte[max * abi.EpollEventSize];
        int n = EpollWaitRaw(epfd, buffer, max, timeoutMilliseconds);
        if (n < 0)
        {
            return -Marshal.GetLastPInvokeError();
        }

        for (int i = 0; i < n; i++)
        {
            byte* entry = buffer + (i * abi.EpollEventSize);
            events[i] = *(uint*)entry;
            tokens[i] = *(ulong*)(entry + abi.EpollDataOffset);
        }

        return n;
    }

    /// <summary>Adds one to an eventfd's counter (wakes an epoll waiting on it).</summary>
    public static void EventFdSignal(int fd)
    {
        ulong one = 1;
        _ = WriteRaw(fd, &one, sizeof(ulong));
    }

    /// <summary>Resets an eventfd's counter (non-blocking).</summary>
    public static void EventFdDrain(int fd)
    {
        ulong value;
        _ = ReadRaw(fd, &value, sizeof(ulong));
    }
}
