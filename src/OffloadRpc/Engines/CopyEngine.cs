using System.Diagnostics;
using System.Runtime.InteropServices;
using OffloadRpc.Transport;

namespace OffloadRpc.Engines;

/// <summary>Flags of a copy descriptor (the bit has the meaning of the DSA descriptor's cache-control flag).</summary>
[Flags]
internal enum CopyFlags : uint
{
    None = 0,

    /// <summary>Leave the destination in the cache for a reader that comes right after (DSA: cache control); clear = write around the cache.</summary>
    CacheInject = 0x100,
}

/// <summary>
/// One copy, laid out like an Intel DSA descriptor (64 bytes: flags, completion address, source,
/// destination, size), so that a hardware engine could take the same batches as the software ones.
/// </summary>
[StructLayout(LayoutKind.Explicit, Size = 64)]
internal struct CopyDescriptor
{
    [FieldOffset(0)]
    public CopyFlags Flags;

    [FieldOffset(8)]
    public ulong CompletionAddress;

    [FieldOffset(16)]
    public nint Source;

    [FieldOffset(24)]
    public nint Destination;

    [FieldOffset(32)]
    public ulong Length;

    public static CopyDescriptor Create(nint source, nint destination, ulong length, CachePolicy cache) => new()
    {
        Source = source,
        Destination = destination,
        Length = length,
        Flags = cache == CachePolicy.Bypass ? CopyFlags.None : CopyFlags.CacheInject,
    };
}

/// <summary>
/// A copy engine: takes batches of descriptors and reports completion through a completion record
/// the submitter polls or waits on. The CPU engine copies inline; the worker engine on dedicated
/// threads. A hardware engine (Intel DSA) is only detected (see <see cref="DsaDetection"/>).
/// </summary>
internal interface ICopyEngine
{
    string Name { get; }

    /// <summary>What the engine runs on here (threads, store flavour), for the engine listing.</summary>
    string Description { get; }

    /// <summary>Submits <paramref name="batch"/>; <paramref name="completion"/> counts each descriptor down as it finishes.</summary>
    void Submit(ReadOnlySpan<CopyDescriptor> batch, CopyCompletion completion);
}

/// <summary>
/// The completion record of a batch: the descriptors still outstanding. The submitter polls
/// <see cref="IsCompleted"/> or blocks in <see cref="Wait"/> (<see cref="SharedWait"/>: spin, then a
/// futex sleep on a word of its own). Reusable: the condition is the count itself, never a latched
/// signal that a previous batch could leave set.
/// </summary>
internal sealed class CopyCompletion
{
    /// <summary>The futex word, on a pinned cache line of its own (the pinned heap never moves it).</summary>
    private readonly int[] _word = GC.AllocateArray<int>(16, pinned: true);
    private readonly AdaptiveSpin _spin = new(TimeSpan.FromMicroseconds(50));
    private int _outstanding;
    private Action<object?>? _continuation;
    private object? _continuationState;

    public bool IsCompleted => Volatile.Read(ref _outstanding) == 0;

    /// <summary>Announces <paramref name="count"/> more descriptors before they are submitted.</summary>
    public void Expect(int count) => Interlocked.Add(ref _outstanding, count);

    /// <summary>Runs <paramref name="continuation"/> on the engine thread that completes the last descriptor. Register before submitting.</summary>
    public void OnCompleted(Action<object?> continuation, object? state)
    {
        _continuationState = state;
        Volatile.Write(ref _continuation, continuation);
    }

    /// <summary>Called by an engine as each descriptor finishes.</summary>
    public unsafe void Complete(int count = 1)
    {
        // Interlocked.Add is a full fence before the wake reads the word (Dekker with the waiter's arm).
        int remaining = Interlocked.Add(ref _outstanding, -count);
        Debug.Assert(remaining >= 0, "more descriptors completed than were expected");
        if (remaining != 0)
        {
            return;
        }

        if (Interlocked.Exchange(ref _continuation, null) is { } continuation)
        {
            continuation(_continuationState);
        }

        fixed (int* word = _word)
        {
            SharedWait.Wake(word);
        }
    }

    /// <summary>Blocks until every descriptor finished: spins briefly (a chunk takes microseconds), then sleeps.</summary>
    public unsafe void Wait()
    {
        var done = new Done(this);
        fixed (int* word = _word)
        {
            SharedWait.Wait(ref done, word, _spin, singleWaiter: true);
        }
    }

    private readonly struct Done(CopyCompletion completion) : IWaitCondition
    {
        public bool IsSatisfied() => completion.IsCompleted;

        public bool IsAbandoned() => false;
    }
}

/// <summary>Copies inline on the submitting thread: temporal or non-temporal stores by the cache flag.</summary>
internal sealed unsafe class CpuCopyEngine : ICopyEngine
{
    public static CpuCopyEngine Instance { get; } = new();

    public string Name => "cpu";

    public string Description => $"inline on the calling thread; non-temporal stores: {CopyRoutines.NonTemporalFlavor}";

    public void Submit(ReadOnlySpan<CopyDescriptor> batch, CopyCompletion completion)
    {
        completion.Expect(batch.Length);
        foreach (CopyDescriptor descriptor in batch)
        {
            Execute(descriptor);
            completion.Complete();
        }
    }

    public static void Execute(in CopyDescriptor descriptor) =>
        CopyRoutines.Copy((byte*)descriptor.Source, (byte*)descriptor.Destination, (nuint)descriptor.Length, (descriptor.Flags & CopyFlags.CacheInject) == 0);
}

/// <summary>
/// Whether an Intel DSA (idxd) user work queue exists here. Detection only: OffloadRpc has no DSA
/// engine, so the answer is always "absent" with the reason, and a machine that has the device says
/// so (the engine list never holds an engine that cannot run).
/// </summary>
internal static class DsaDetection
{
    private const string DeviceDirectory = "/dev/dsa";

    /// <summary>Why there is no DSA engine on this machine: no Intel CPU, no idxd work queue, or no submission path in OffloadRpc.</summary>
    public static string Describe() => Describe(CpuVendor(), Directory.Exists(DeviceDirectory) ? Directory.GetFileSystemEntries(DeviceDirectory, "wq*") : null);

    /// <summary>The reason for a CPU vendor string and the work queues found (null: no device directory).</summary>
    internal static string Describe(string? vendor, string[]? workQueues)
    {
        if (vendor is not null && vendor != "GenuineIntel")
        {
            return $"absent: not an Intel CPU ({vendor}); DSA is an Intel accelerator";
        }

        if (workQueues is null)
        {
            return $"absent: no {DeviceDirectory} (no DSA device, or the idxd driver exposes no user work queue)";
        }

        return workQueues.Length == 0
            ? $"absent: {DeviceDirectory} has no work queue (configure one with accel-config)"
            : $"absent: work queues present ({string.Join(", ", workQueues.Select(Path.GetFileName))}) but OffloadRpc has no DSA submission path";
    }

    private static string? CpuVendor()
    {
        try
        {
            string? line = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("vendor_id", StringComparison.Ordinal));
            return line?[(line.IndexOf(':') + 1)..].Trim();
        }
        catch (IOException)
        {
            return null;
        }
    }
}
