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

        nuint done = 0;
        if (Avx512F.IsSupported)
        {
            for (; done + 256 <= length; done += 256)
            {
                Vector512<byte> a = Vector512.Load(source + done);
                Vector512<byte> b = Vector512.Load(source + done + 64);
                Vector512<byte> c = Vector512.Load(source + done + 128);
                Vector512<byte> d = Vector512.Load(source + done + 192);
                Avx512F.StoreAlignedNonTemporal(destination + done, a);
                Avx512F.StoreAlignedNonTemporal(destination + done + 64, b);
                Avx512F.StoreAlignedNonTemporal(destination + done + 128, c);
                Avx512F.StoreAlignedNonTemporal(destination + done + 192, d);
            }
        }
        else if (Avx.IsSupported)
        {
            for (; done + 128 <= length; done += 128)
            {
                Vector256<byte> a = Vector256.Load(source + done);
                Vector256<byte> b = Vector256.Load(source + done + 32);
                Vector256<byte> c = Vector256.Load(source + done + 64);
                Vector256<byte> d = Vector256.Load(source + done + 96);
                Avx.StoreAlignedNonTemporal(destination + done, a);
                Avx.StoreAlignedNonTemporal(destination + done + 32, b);
                Avx.StoreAlignedNonTemporal(destination + done + 64, c);
                Avx.StoreAlignedNonTemporal(destination + done + 96, d);
            }
        }
        else
        {
            for (; done + 64 <= length; done += 64)
            {
                Vector128<byte> a = Vector128.Load(source + done);
                Vector128<byte> b = Vector128.Load(source + done + 16);
                Vector128<byte> c = Vector128.Load(source + done + 32);
                Vector128<byte> d = Vector128.Load(source + done + 48);
                Sse2.StoreAlignedNonTemporal(destination + done, a);
                Sse2.StoreAlignedNonTemporal(destination + done + 16, b);
                Sse2.StoreAlignedNonTemporal(destination + done + 32, c);
                Sse2.StoreAlignedNonTemporal(destination + done + 48, d);
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
