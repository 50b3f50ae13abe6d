using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace OffloadRpc.Testing;

/// <summary>A fast 64-bit checksum over every byte (a multiply-xor mix per 8-byte word), for verifying payload content across processes.</summary>
internal static class Checksum64
{
    public static ulong Compute(ReadOnlySpan<byte> data)
    {
        ulong h1 = 0x9E37_79B9_7F4A_7C15UL ^ (ulong)data.Length;
        ulong h2 = 0xC2B2_AE3D_27D4_EB4FUL;
        ReadOnlySpan<ulong> words = MemoryMarshal.Cast<byte, ulong>(data);
        int i = 0;
        for (; i + 1 < words.Length; i += 2)
        {
            h1 = (h1 ^ words[i]) * 0xFF51_AFD7_ED55_8CCDUL;
            h2 = (h2 ^ words[i + 1]) * 0xC4CE_B9FE_1A85_EC53UL;
            h1 ^= h1 >> 29;
            h2 ^= h2 >> 31;
        }

        if (i < words.Length)
        {
            h1 = (h1 ^ words[i]) * 0xFF51_AFD7_ED55_8CCDUL;
        }

        for (int b = words.Length * 8; b < data.Length; b++)
        {
            h2 = (h2 ^ data[b]) * 0x100_0000_01B3UL;
        }

        ulong h = h1 ^ (h2 * 0x9E37_79B9_7F4A_7C15UL);
        h ^= h >> 33;
        h *= 0xFF51_AFD7_ED55_8CCDUL;
        h ^= h >> 33;
        return h;
    }

    /// <summary>Fills <paramref name="destination"/> with bytes derived from <paramref name="seed"/> (xorshift), fast enough for hundreds of MiB.</summary>
    public static void Fill(Span<byte> destination, ulong seed)
    {
        ulong state = seed * 0x9E37_79B9_7F4A_7C15UL + 1;
        Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(destination);
        for (int i = 0; i < words.Length; i++)
        {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            words[i] = state;
        }

        for (int b = words.Length * 8; b < destination.Length; b++)
        {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            destination[b] = (byte)state;
        }
    }

    public static void WriteUInt64(Span<byte> destination, ulong value) => BinaryPrimitives.WriteUInt64LittleEndian(destination, value);
}
