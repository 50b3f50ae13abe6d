using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// The descriptors that came with one socket frame, each already owned by a handle.
/// <see cref="Take"/> moves one to a new owner; <see cref="Dispose"/> closes those nobody took, so
/// a frame that is rejected, malformed or simply not about descriptors leaks none. The default
/// value holds none.
/// </summary>
internal readonly struct ReceivedDescriptors : IDisposable
{
    private readonly SafeMemfdHandle?[]? _handles;

    public ReceivedDescriptors(SafeMemfdHandle?[]? handles, int count)
    {
        if (handles is null)
        {
            ArgumentOutOfRangeException.ThrowIfNotEqual(count, 0);
        }
        else
        {
            ArgumentOutOfRangeException.ThrowIfGreaterThan((uint)count, (uint)handles.Length, nameof(count));
        }

        _handles = handles;
        Count = count;
    }

    /// <summary>How many descriptors the frame carried (taken ones included).</summary>
    public int Count { get; }

    /// <summary>Moves descriptor <paramref name="index"/> to the caller, who owns (and must dispose) it from here.</summary>
    /// <exception cref="InvalidOperationException">It was taken before.</exception>
    public SafeMemfdHandle Take(int index)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual((uint)index, (uint)Count, nameof(index));
        return Interlocked.Exchange(ref _handles![index], null) ?? throw new InvalidOperationException($"Descriptor {index} of the frame was already taken.");
    }

    /// <summary>Closes every descriptor nobody took; idempotent.</summary>
    public void Dispose()
    {
        for (int i = 0; i < Count; i++)
        {
            Interlocked.Exchange(ref _handles![i], null)?.Dispose();
        }
    }
}
