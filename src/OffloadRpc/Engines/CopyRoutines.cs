using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace OffloadRpc.Engines;

/// <summary>
/// The two ways a CPU moves bytes: ordinary (temporal) stores that leave the destination in cache
/// for a reader that comes right after, and non-temporal stores that bypass the cache (faster for
/// buffers larger than the last-level cache, and they do not evict the receiver's working set).
/// Correct for any alignment, length and (non-overlapping) placement.
/// </summary>
internal static unsafe class CopyRoutines
{
    /// <summary>Below this, non-temporal stores are not worth the alignment work and the fence.</summary>
    public const int NonTemporalThreshold = TransferThresholds.NonTemporalBytes;

    /// <summary>Which vector width the non-temporal path uses on this CPU ("AVX-512", "AVX2" or "scalar").</summary>
    public static string NonTemporalFlavor => Avx512F.IsSupported ? "AVX-512" : Avx.IsSupported ? "AVX2" : Sse2.IsSupported ? "SSE2" : "scalar";

    public static void Temporal(byte* source, byte* destination, nuint length) =>
        Buffer.MemoryCopy(source, destination, length, length);

    /// <summary>Non-temporal copy: unaligned loads, 64-byte-aligned streaming stores, then a store fence so the bytes are visible before anything published after.</summary>
    public static void NonTemporal(byte* source, byte* destination, nuint length)
    {
        if (length < NonTemporalThreshold || !Sse2.IsSupported || Overlap(source, destination, length))
        {
            Temporal(source, destination, length);
            return;
        }

        nuint head = (nuint)(-(nint)destination & 63);
        if (head != 0)
        {
            Temporal(source, destination, head);
            source += head;
            destination += head;
            length -= head;
        }

        // One streaming store per iteration: non-temporal stores are bound by memory bandwidth, which
        // unrolling does not raise (measured: the same GB/s at 1, 16 and 256 MiB).
        nuint done = 0;
        if (Avx512F.IsSupported)
        {
            for (; done + 64 <= length; done += 64)
            {
                Avx512F.StoreAlignedNonTemporal(destination + done, Vector512.Load(source + done));
            }
        }
        else if (Avx.IsSupported)
        {
            for (; done + 32 <= length; done += 32)
            {
                Avx.StoreAlignedNonTemporal(destination + done, Vector256.Load(source + done));
            }
        }
        else
        {
            for (; done + 16 <= length; done += 16)
            {
                Sse2.StoreAlignedNonTemporal(destination + done, Vector128.Load(source + done));
            }
        }

        if (done < length)
        {
            Temporal(source + done, destination + done, length - done);
        }

        Sse.StoreFence();
    }

    /// <summary>True when the two ranges share a byte: such a copy must keep memmove semantics (Buffer.MemoryCopy does).</summary>
    public static bool Overlap(byte* source, byte* destination, nuint length) =>
        length != 0 && source < destination + length && destination < source + length;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Copy(byte* source, byte* destination, nuint length, bool bypassCache)
    {
        if (bypassCache)
        {
            NonTemporal(source, destination, length);
        }
        else
        {
            Temporal(source, destination, length);
        }
    }
}
