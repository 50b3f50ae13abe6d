using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using OffloadRpc.Interop;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The structs both processes read and write in shared memory are a wire format: their sizes and field
/// offsets are pinned here, so that a reordered field or a changed enum width fails a test instead of
/// silently breaking two processes built from different commits.
/// </summary>
public sealed class WireLayoutTests
{
    [Fact]
    public void A_message_header_is_32_bytes_with_its_fields_where_the_protocol_says()
    {
        Assert.Equal(MessageHeader.Size, Unsafe.SizeOf<MessageHeader>());
        Assert.Equal(32, MessageHeader.Size);
        AssertOffsets<MessageHeader>(
            (nameof(MessageHeader.Sequence), 0),
            (nameof(MessageHeader.CallId), 8),
            (nameof(MessageHeader.Kind), 16),
            (nameof(MessageHeader.Flags), 18),
            (nameof(MessageHeader.MethodId), 20),
            (nameof(MessageHeader.BodyLength), 24),
            (nameof(MessageHeader.PayloadCount), 28),
            (nameof(MessageHeader.Reserved), 30));
        Assert.Equal(sizeof(ushort), Unsafe.SizeOf<MessageKind>());
        Assert.Equal(sizeof(ushort), Unsafe.SizeOf<MessageFlags>());
    }

    [Fact]
    public void A_payload_reference_is_24_bytes_and_the_largest_message_head_fits_the_smallest_slot()
    {
        Assert.Equal(PayloadRef.Size, Unsafe.SizeOf<PayloadRef>());
        Assert.Equal(24, PayloadRef.Size);
        AssertOffsets<PayloadRef>(
            (nameof(PayloadRef.SegmentId), 0),
            (nameof(PayloadRef.Flags), 4),
            (nameof(PayloadRef.Offset), 8),
            (nameof(PayloadRef.Length), 16));
        Assert.True(MessageHeader.Size + (TransportProtocol.MaxPayloadsPerMessage * PayloadRef.Size) <= RingGeometry.MinSlotSize);
    }

    [Fact]
    public void A_pipeline_header_is_one_64_byte_cache_line_with_its_futex_word_aligned()
    {
        Assert.Equal(PipelineHeader.Size, Unsafe.SizeOf<PipelineHeader>());
        Assert.Equal(64, PipelineHeader.Size);
        AssertOffsets<PipelineHeader>(
            (nameof(PipelineHeader.Total), 0),
            (nameof(PipelineHeader.BytesReady), 8),
            (nameof(PipelineHeader.ChunksReady), 16),
            (nameof(PipelineHeader.ReceiverWaiting), 20),
            (nameof(PipelineHeader.BytesConsumed), 24),
            (nameof(PipelineHeader.ConsumedCount), 32),
            (nameof(PipelineHeader.SenderWaiting), 36),
            (nameof(PipelineHeader.ReaderClosed), 40),
            (nameof(PipelineHeader.Announced), 48));
        Assert.Equal(0, (int)Marshal.OffsetOf<PipelineHeader>(nameof(PipelineHeader.ChunksReady)) % sizeof(int)); // futex words are 4-byte aligned
        Assert.Equal(0, (int)Marshal.OffsetOf<PipelineHeader>(nameof(PipelineHeader.ConsumedCount)) % sizeof(int));
        Assert.Equal(4u, PayloadRef.Streamed); // a ring: only with Pipelined
        Assert.Equal(8u, PayloadRef.LengthAnnounced); // a ring whose length is in the header: only with Streamed
    }

    [Fact]
    public void Each_supported_architecture_has_its_own_syscall_table_and_any_other_is_refused()
    {
        Assert.Equal(202, LinuxAbi.For(Architecture.X64).SysFutex);
        Assert.Equal(98, LinuxAbi.For(Architecture.Arm64).SysFutex);
        Assert.Equal((24, 28), (LinuxAbi.X64.StatModeOffset, LinuxAbi.X64.StatUidOffset));
        Assert.Equal((16, 24), (LinuxAbi.Arm64.StatModeOffset, LinuxAbi.Arm64.StatUidOffset));
        Assert.Throws<PlatformNotSupportedException>(() => LinuxAbi.For(Architecture.X86));
        Assert.Throws<PlatformNotSupportedException>(() => LinuxAbi.For(Architecture.RiscV64));
        Assert.Throws<PlatformNotSupportedException>(() => LinuxAbi.For(Architecture.X64, isLinux: false));
        Assert.Equal(RuntimeInformation.ProcessArchitecture, LinuxAbi.Current.Architecture);
        Assert.Equal(449, LinuxAbi.X64.SysFutexWaitv);
        Assert.Equal(449, LinuxAbi.Arm64.SysFutexWaitv);
        Assert.Equal((12, 4), (LinuxAbi.X64.EpollEventSize, LinuxAbi.X64.EpollDataOffset)); // packed on x86-64
        Assert.Equal((16, 8), (LinuxAbi.Arm64.EpollEventSize, LinuxAbi.Arm64.EpollDataOffset));
    }

    [Fact]
    public void The_futex_waitv_entry_has_the_kernels_layout()
    {
        // struct futex_waitv { __u64 val; __u64 uaddr; __u32 flags; __u32 __reserved; }
        Assert.Equal(24, Marshal.SizeOf<LinuxNative.FutexWaiter>());
        Assert.Equal(0, (int)Marshal.OffsetOf<LinuxNative.FutexWaiter>(nameof(LinuxNative.FutexWaiter.Value)));
        Assert.Equal(8, (int)Marshal.OffsetOf<LinuxNative.FutexWaiter>(nameof(LinuxNative.FutexWaiter.Address)));
        Assert.Equal(16, (int)Marshal.OffsetOf<LinuxNative.FutexWaiter>(nameof(LinuxNative.FutexWaiter.Flags)));
    }

    [Fact]
    public unsafe void Futex_waitv_returns_the_index_of_a_word_that_no_longer_holds_its_value_and_times_out_otherwise()
    {
        int* words = stackalloc int[2];
        words[0] = 1;
        words[1] = 1;
        LinuxNative.FutexWaiter* waiters = stackalloc LinuxNative.FutexWaiter[2];
        waiters[0] = LinuxNative.FutexWaiter.For(&words[0], 1);
        waiters[1] = LinuxNative.FutexWaiter.For(&words[1], 1);
        Assert.Equal(-LinuxNative.ETIMEDOUT, LinuxNative.FutexWaitv(waiters, 2, 10));
        words[1] = 0;
        Assert.Equal(-LinuxNative.EAGAIN, LinuxNative.FutexWaitv(waiters, 2, 1000)); // a changed word: at once
    }

    [Fact]
    public unsafe void The_futex_number_of_this_architecture_is_the_kernels_a_wait_on_a_changed_word_returns_at_once()
    {
        int word = 5;
        // FUTEX_WAIT on a word that does not hold the expected value fails with EAGAIN at once; a wrong
        // syscall number would do something else entirely (or wait for the whole timeout).
        Assert.Equal(-1, LinuxNative.FutexWait(&word, 4, 10_000));
        Assert.Equal(LinuxNative.EAGAIN, Marshal.GetLastPInvokeError());
    }

    private static void AssertOffsets<T>(params (string Field, int Offset)[] expected)
        where T : struct
    {
        foreach ((string field, int offset) in expected)
        {
            Assert.True(offset == (int)Marshal.OffsetOf<T>(field), $"{typeof(T).Name}.{field} is at {(int)Marshal.OffsetOf<T>(field)}, the wire format says {offset}");
        }
    }
}
