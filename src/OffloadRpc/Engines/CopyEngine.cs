using System.Runtime.InteropServices;

namespace OffloadRpc.Engines;

/// <summary>Flags of a copy descriptor (the DSA meaning of the cache-control bit).</summary>
[Flags]
internal enum CopyFlags : uint
{
    None = 0,

    /// <summary>Leave the destination in the cache for a reader that comes right after (DSA: cache control); clear = write around the cache.</summary>
    CacheInject = 0x100,
}

/// <summary>
/// One copy, laid out like an Intel DSA descriptor (64 bytes: flags, completion address, source,
/// destination, size), so that software engines and the hardware engine take the same batches.
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

/// <summary>Whether an engine can run here, and why not.</summary>
internal readonly record struct EngineAvailability(bool IsAvailable, string Reason);

/// <summary>
/// A copy engine: takes batches of descriptors and reports completion through a completion record
/// the submitter polls or waits on. The CPU engine copies inline; the worker engine on dedicated
/// threads; the hardware engine (Intel DSA) would write descriptors to a work queue.
/// </summary>
internal interface ICopyEngine
{
    string Name { get; }

    EngineAvailability Availability { get; }

    /// <summary>Submits <paramref name="batch"/>; <paramref name="completion"/> counts each descriptor down as it finishes.</summary>
    void Submit(ReadOnlySpan<CopyDescriptor> batch, CopyCompletion completion);
}

/// <summary>
/// The completion record of a batch: the descriptors still outstanding. The submitter polls
/// <see cref="IsCompleted"/> or blocks in <see cref="Wait"/> (spin, then sleep). Reusable: the
/// condition is the count itself, never a latched signal that a previous batch could leave set.
/// </summary>
internal sealed class CopyCompletion
{
    private readonly object _gate = new();
    private int _outstanding;
    private int _waiting;
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
    public void Complete(int count = 1)
    {
        // Interlocked.Add is a full fence: the waiter either sees the count reach zero or has flagged
        // itself before we read the flag (it flags with a fence, then re-checks the count).
        if (Interlocked.Add(ref _outstanding, -count) != 0)
        {
            return;
        }

        if (Interlocked.Exchange(ref _continuation, null) is { } continuation)
        {
            continuation(_continuationState);
        }

        if (Volatile.Read(ref _waiting) != 0)
        {
            lock (_gate)
            {
                Monitor.PulseAll(_gate);
            }
        }
    }

    /// <summary>Spins briefly (a chunk takes microseconds), then sleeps until every descriptor finished.</summary>
    public void Wait()
    {
        var spinner = new SpinWait();
        for (int i = 0; i < 200 && !IsCompleted; i++)
        {
            spinner.SpinOnce(sleep1Threshold: -1);
        }

        if (IsCompleted)
        {
            return;
        }

        lock (_gate)
        {
            Interlocked.Exchange(ref _waiting, 1);
            while (!IsCompleted)
            {
                Monitor.Wait(_gate, 50);
            }

            Volatile.Write(ref _waiting, 0);
        }
    }
}

/// <summary>Copies inline on the submitting thread: temporal or non-temporal stores by the cache flag.</summary>
internal sealed unsafe class CpuCopyEngine : ICopyEngine
{
    public static CpuCopyEngine Instance { get; } = new();

    public string Name => "cpu";

    public EngineAvailability Availability => new(true, $"inline on the calling thread; non-temporal stores: {CopyRoutines.NonTemporalFlavor}");

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

/// <summary>The hardware engine's place: Intel DSA through an idxd user work queue. Detected, never faked.</summary>
internal sealed class DsaCopyEngine : ICopyEngine
{
    public string Name => "dsa";

    public EngineAvailability Availability
    {
        get
        {
            if (!Directory.Exists("/dev/dsa"))
            {
                return new(false, "no /dev/dsa: no Intel DSA device, or the idxd driver exposes no user work queue");
            }

            string[] queues = Directory.GetFileSystemEntries("/dev/dsa", "wq*");
            return queues.Length == 0
                ? new(false, "/dev/dsa has no work queue (configure one with accel-config)")
                : new(false, $"work queues present ({string.Join(", ", queues.Select(Path.GetFileName))}) but descriptor submission is not implemented yet");
        }
    }

    public void Submit(ReadOnlySpan<CopyDescriptor> batch, CopyCompletion completion) =>
        throw new PlatformNotSupportedException("The Intel DSA engine is not available: " + Availability.Reason);
}
