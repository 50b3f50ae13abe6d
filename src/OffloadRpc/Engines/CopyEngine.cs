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

/// <summary>
/// A copy engine: takes batches of descriptors and reports completion through a completion record
/// the submitter polls or waits on. The CPU engine copies inline, the worker engine on dedicated
/// threads. Every engine that exists can run; hardware that is not driven (Intel DSA) is only probed
/// (<see cref="DsaProbe"/>).
/// </summary>
internal interface ICopyEngine
{
    string Name { get; }

    /// <summary>How it copies, for <c>offloadrpc doctor</c>.</summary>
    string Description { get; }

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
/// Intel DSA: detected, never faked. OffloadRpc has no DSA engine: submitting descriptors to an idxd
/// work queue could not be tested on the machines this project runs on (AMD, no /dev/dsa), so it is not
/// offered; this probe only says whether the hardware is there, for <c>offloadrpc doctor</c>.
/// </summary>
internal static class DsaProbe
{
    public const string DeviceDirectory = "/dev/dsa";

    /// <summary>Whether <paramref name="deviceDirectory"/> holds idxd user work queues, and what that means for copies here.</summary>
    public static HardwareProbe Detect(string deviceDirectory = DeviceDirectory)
    {
        if (!Directory.Exists(deviceDirectory))
        {
            return new(false, $"absent: no {deviceDirectory} (no Intel DSA device, or the idxd driver exposes no user work queue); copies use the cpu and worker engines");
        }

        string[] queues = Directory.GetFileSystemEntries(deviceDirectory, "wq*");
        if (queues.Length == 0)
        {
            return new(false, $"absent: {deviceDirectory} has no work queue (configure one with accel-config); copies use the cpu and worker engines");
        }

        Array.Sort(queues, StringComparer.Ordinal);
        return new(true, $"present ({string.Join(", ", queues.Select(Path.GetFileName))}), but this OffloadRpc does not submit to DSA; copies use the cpu and worker engines");
    }
}

/// <summary>What a hardware probe found.</summary>
internal readonly record struct HardwareProbe(bool IsPresent, string Detail);
