using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The handles that own this process's native resources, checked against the kernel's own view:
/// /proc/self/fd for descriptors, /proc/self/maps and the process-wide counters for mappings.
/// A memfd is closed exactly once; a mapping goes when its last reference does, not when its owner
/// lets go; a reference can be added while any is held and never after the last; a reference given
/// back twice is reported.
/// </summary>
public sealed partial class NativeHandleTests
{
    private const long Size = 1 << 20;
    private const int F_DUPFD_CLOEXEC = 1030;

    [Fact]
    public void A_memfd_handle_closes_its_descriptor_exactly_once()
    {
        string name = Unique("close-once");
        SafeMemfdHandle handle = LinuxNative.MemfdCreateHandle(name, LinuxNative.MFD_CLOEXEC);
        Assert.False(handle.IsInvalid);
        int fd = (int)handle.DangerousGetHandle();
        Assert.Equal(MemfdLink(name), LinkTarget(fd));
        string newcomerName = Unique("newcomer");
        using SafeMemfdHandle newcomer = LinuxNative.MemfdCreateHandle(newcomerName, LinuxNative.MFD_CLOEXEC);

        handle.Dispose();
        Assert.True(handle.IsClosed);
        Assert.Null(LinkTarget(fd));

        // The number is free again: give exactly it to another memfd, then dispose the first handle
        // once more. A second close() would close the newcomer.
        using var reused = new SafeMemfdHandle(LinuxNative.Fcntl(newcomer, F_DUPFD_CLOEXEC, fd));
        Assert.Equal(fd, (int)reused.DangerousGetHandle());

        handle.Dispose();

        Assert.Equal(MemfdLink(newcomerName), LinkTarget(fd));
    }

    [Fact]
    public void A_memfd_handle_nobody_disposed_is_closed_by_its_finalizer()
    {
        string name = Unique("dropped");
        int fd = CreateAndDrop(name);
        Assert.Equal(MemfdLink(name), LinkTarget(fd));

        GC.Collect();
        GC.WaitForPendingFinalizers();

        Assert.NotEqual(MemfdLink(name), LinkTarget(fd));
    }

    [Fact]
    public void A_failed_memfd_create_gives_an_invalid_handle_that_closes_nothing()
    {
        using SafeMemfdHandle handle = LinuxNative.MemfdCreateHandle(Unique("bad-flags"), 0x8000_0000);
        Assert.True(handle.IsInvalid);
        Assert.Equal(-1, (int)handle.DangerousGetHandle());
    }

    [Fact]
    public unsafe void A_mapping_is_unmapped_only_when_its_last_reference_goes()
    {
        (long bytes, long live) = Settle();
        string name = Unique("last-reference");
        SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, name, populate: false);
        int fd = (int)segment.Descriptor.DangerousGetHandle();
        Assert.Equal((bytes + Size, live + 1), Counters());
        Assert.True(IsInMaps(name));

        Assert.True(segment.TryAddReference()); // a lease
        Assert.True(segment.TryAddReference()); // a pin of the lease
        segment.Dispose(); // the owner lets go: its memfd closes, the mapping stays
        segment.Dispose(); // idempotent

        Assert.NotEqual(MemfdLink(name), LinkTarget(fd));
        Assert.Throws<ObjectDisposedException>(() => segment.Descriptor);
        Assert.True(segment.IsMapped);
        Assert.Equal((bytes + Size, live + 1), Counters());
        *segment.Pointer(Size - 1, 1) = 42; // still memory
        Assert.Equal(42, *segment.Pointer(Size - 1, 1));

        segment.Release(); // the pin
        Assert.True(segment.IsMapped);
        Assert.True(IsInMaps(name));

        segment.Release(); // the lease, the last reference
        Assert.False(segment.IsMapped);
        Assert.False(IsInMaps(name));
        Assert.Equal((bytes, live), Counters());
    }

    [Fact]
    public void A_reference_can_be_added_after_the_owner_disposed_while_another_is_held_and_never_after_the_last()
    {
        (long bytes, long live) = Settle();
        SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, Unique("add-after-owner"), populate: false);
        Assert.True(segment.TryAddReference()); // a lease
        segment.Dispose(); // the connection that owned the segment is gone

        // SafeHandle refuses a reference once the count is zero, not merely after Dispose: the live
        // lease can still be pinned (SharedBuffer's Memory handed to I/O after its connection closed).
        Assert.True(segment.TryAddReference());
        segment.Release(); // unpinned
        segment.Release(); // the lease is disposed: the last reference
        Assert.Equal((bytes, live), Counters());

        // Nothing brings an unmapped segment back.
        Assert.False(segment.TryAddReference());
        Assert.False(segment.IsMapped);
        Assert.Equal((bytes, live), Counters());
    }

    [Fact]
    public void A_reference_cannot_be_added_once_the_owner_disposed_and_nobody_else_held_one()
    {
        (long bytes, long live) = Settle();
        SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, Unique("owner-only"), populate: false);
        segment.Dispose();

        Assert.False(segment.IsMapped);
        Assert.Equal((bytes, live), Counters());
        Assert.False(segment.TryAddReference()); // e.g. a wake-up racing the connection's teardown: skipped, not an error
    }

    [Fact]
    public void A_reference_given_back_twice_after_the_owner_let_go_is_caught_at_the_second_release()
    {
        (long bytes, long live) = Settle();
        SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, Unique("double-release"), populate: false);
        Assert.True(segment.TryAddReference());
        segment.Dispose();
        segment.Release();

        Assert.Throws<InvalidOperationException>(segment.Release);
        Assert.Equal((bytes, live), Counters()); // counted out once
    }

    [Fact]
    public void A_reference_given_back_twice_while_the_owner_holds_on_is_reported_to_the_owner()
    {
        (long bytes, long live) = Settle();
        ReleaseTwiceAndDispose(Unique("stolen-owner-reference"), out bool mappedAfterDoubleRelease, out Exception? ownerDispose);

        // The second release took the owner's reference (a count cannot tell references apart): the
        // memory went early, and the owner hears of it when it lets go.
        Assert.False(mappedAfterDoubleRelease);
        Assert.IsType<InvalidOperationException>(ownerDispose);
        Assert.Equal((bytes, live), Counters()); // counted out once

        // The handle's finalizer leaves the closed handle alone (a throw there would end the test process).
        GC.Collect();
        GC.WaitForPendingFinalizers();
    }

    [Fact]
    public void MapPeer_owns_the_received_descriptor_and_closes_it_whether_it_maps_or_refuses()
    {
        (long bytes, long live) = Settle();

        string unsealedName = Unique("peer-unsealed");
        SafeMemfdHandle unsealed = LinuxNative.MemfdCreateHandle(unsealedName, LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
        Assert.Equal(0, LinuxNative.Ftruncate(unsealed, Size));
        int unsealedFd = (int)unsealed.DangerousGetHandle();
        Assert.Throws<ProtocolViolationException>(() => SharedMemorySegment.MapPeer(1, unsealed, Size, Size));
        Assert.True(unsealed.IsClosed);
        Assert.NotEqual(MemfdLink(unsealedName), LinkTarget(unsealedFd));

        string sealedName = Unique("peer-sealed");
        SafeMemfdHandle sealedFd = LinuxNative.MemfdCreateHandle(sealedName, LinuxNative.MFD_CLOEXEC | LinuxNative.MFD_ALLOW_SEALING);
        Assert.Equal(0, LinuxNative.Ftruncate(sealedFd, Size));
        Assert.Equal(0, LinuxNative.Fcntl(sealedFd, LinuxNative.F_ADD_SEALS, SharedMemorySegment.RequiredSeals));
        using (SharedMemorySegment segment = SharedMemorySegment.MapPeer(2, sealedFd, Size, Size))
        {
            Assert.True(sealedFd.IsClosed); // a peer's segment is never passed on: the mapping is all that is kept
            Assert.Throws<ObjectDisposedException>(() => segment.Descriptor);
            Assert.True(segment.IsMapped);
            Assert.True(IsInMaps(sealedName));
            Assert.Equal((bytes + Size, live + 1), Counters());
        }

        Assert.False(IsInMaps(sealedName));
        Assert.Equal((bytes, live), Counters());
    }

    [Fact]
    public void Descriptors_that_arrive_on_a_socket_are_owned_by_handles_and_closed_unless_taken()
    {
        (Socket left, Socket right) = CreateSocketPair();
        using var sender = new SocketChannel(left);
        using var receiver = new SocketChannel(right);
        string name = Unique("passed");
        using SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, name, populate: false);
        Assert.Equal(1, CountDescriptorsOf(name));

        sender.Send(FrameType.AddSegment, [1, 2, 3], segment.Descriptor, TimeSpan.FromSeconds(5));
        sender.Send(FrameType.AddSegment, [4], segment.Descriptor, TimeSpan.FromSeconds(5));
        Assert.Equal(1, CountDescriptorsOf(name)); // the sender keeps its own; the copies are in flight

        Assert.Equal(FrameStatus.Frame, receiver.TryReceive(out FrameType type, out ReadOnlySpan<byte> payload, out ReceivedDescriptors first));
        Assert.Equal(FrameType.AddSegment, type);
        Assert.Equal(3, payload.Length);
        Assert.Equal(1, first.Count);
        SafeMemfdHandle taken = first.Take(0);
        first.Dispose(); // nothing left in it to close
        Assert.Throws<InvalidOperationException>(() => first.Take(0));
        Assert.Equal(MemfdLink(name), LinkTarget((int)taken.DangerousGetHandle()));

        Assert.Equal(FrameStatus.Frame, receiver.TryReceive(out _, out _, out ReceivedDescriptors second));
        Assert.Equal(3, CountDescriptorsOf(name)); // the sender's, the taken one, the second frame's
        second.Dispose(); // nobody took it
        Assert.Equal(2, CountDescriptorsOf(name));

        taken.Dispose();
        segment.CloseDescriptor();
        Assert.Equal(0, CountDescriptorsOf(name));
        Assert.True(segment.IsMapped);
    }

    [Fact]
    public unsafe void Descriptors_of_a_frame_the_peer_never_finishes_are_closed_at_end_of_stream()
    {
        // A peer sends one byte of a frame header with descriptors attached and hangs up: the reader keeps
        // them while it waits for the rest (a read never blocks), and closes them when the stream ends.
        (Socket left, Socket right) = CreateSocketPair();
        using var receiver = new SocketChannel(right);
        string name = Unique("partial");
        using SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, name, populate: false);
        int fd = (int)segment.Descriptor.DangerousGetHandle();
        Assert.Equal(1, LinuxNative.SendSome((int)left.SafeHandle.DangerousGetHandle(), [4], [fd, fd, fd]));

        Assert.Equal(FrameStatus.WouldBlock, receiver.TryReceive(out _, out _, out _));
        Assert.Equal(4, CountDescriptorsOf(name)); // ours and the three in the partial frame

        left.Dispose();
        Assert.Equal(FrameStatus.EndOfStream, receiver.TryReceive(out _, out _, out _));
        Assert.Equal(1, CountDescriptorsOf(name));
    }

    [Fact]
    public void A_send_to_a_peer_that_stops_reading_ends_at_its_deadline()
    {
        (Socket left, Socket right) = CreateSocketPair();
        using var sender = new SocketChannel(left);
        using (right)
        {
            byte[] frame = new byte[SocketChannel.MaxFrameLength];
            var started = System.Diagnostics.Stopwatch.StartNew();
            Assert.Throws<TimeoutException>((Action)(() =>
            {
                while (true)
                {
                    sender.Send(FrameType.RemoveSegment, frame, descriptor: null, TimeSpan.FromMilliseconds(200));
                }
            }));
            Assert.True(started.Elapsed < TimeSpan.FromSeconds(30));
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static int CreateAndDrop(string name)
    {
        SafeMemfdHandle handle = LinuxNative.MemfdCreateHandle(name, LinuxNative.MFD_CLOEXEC);
        return (int)handle.DangerousGetHandle();
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void ReleaseTwiceAndDispose(string name, out bool mappedAfterDoubleRelease, out Exception? ownerDispose)
    {
        SharedMemorySegment segment = SharedMemorySegment.Create(0, Size, name, populate: false);
        Assert.True(segment.TryAddReference());
        segment.Release();
        segment.Release();
        mappedAfterDoubleRelease = segment.IsMapped;
        ownerDispose = Record.Exception(segment.Dispose);
    }

    /// <summary>Runs pending finalizers (a handle another test dropped must not be released mid-test), then reads the counters.</summary>
    private static (long Bytes, long Live) Settle()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        return Counters();
    }

    private static (long Bytes, long Live) Counters() => (SharedMemorySegment.MappedBytes, SharedMemorySegment.LiveSegments);

    private static string Unique(string what) => $"offloadrpc-test-{what}-{Guid.NewGuid():N}";

    private static string MemfdLink(string name) => $"/memfd:{name} (deleted)";

    /// <summary>Where /proc/self/fd/<paramref name="fd"/> points, or null when the descriptor is not open.</summary>
    private static string? LinkTarget(int fd)
    {
        try
        {
            return new FileInfo($"/proc/self/fd/{fd}").LinkTarget;
        }
        catch (IOException)
        {
            return null;
        }
    }

    private static int CountDescriptorsOf(string name)
    {
        int count = 0;
        foreach (string entry in Directory.EnumerateFileSystemEntries("/proc/self/fd"))
        {
            if (int.TryParse(Path.GetFileName(entry), out int fd) && LinkTarget(fd) == MemfdLink(name))
            {
                count++;
            }
        }

        return count;
    }

    private static bool IsInMaps(string name) => File.ReadAllText("/proc/self/maps").Contains("/memfd:" + name, StringComparison.Ordinal);

    private static unsafe (Socket, Socket) CreateSocketPair()
    {
        int* pair = stackalloc int[2];
        Assert.Equal(0, SocketPair(1 /* AF_UNIX */, 1 /* SOCK_STREAM */ | 0x80000 /* SOCK_CLOEXEC */, 0, pair));
        return (new Socket(new SafeSocketHandle(pair[0], ownsHandle: true)), new Socket(new SafeSocketHandle(pair[1], ownsHandle: true)));
    }

    [LibraryImport("libc", EntryPoint = "socketpair", SetLastError = true)]
    private static unsafe partial int SocketPair(int domain, int type, int protocol, int* pair);
}
