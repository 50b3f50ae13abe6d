using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace OffloadRpc.Transport;

/// <summary>
/// Makes the managed array a method's result or its one buffer argument is (a <c>T[]</c> of a primitive
/// element type), so that a transport that copies a message's bytes into this process (gRPC) fills that
/// array as they arrive and the generated decoder or stub takes it as it is, instead of receiving them
/// into a lease and copying them out again.
/// </summary>
internal abstract class ArrayReceiver
{
    /// <summary>
    /// An array of exactly <paramref name="bytes"/> bytes (not cleared: the receiver fills all of them), or
    /// null when they are not a whole number of elements: such a payload goes through a lease, and the
    /// decoder refuses it there as it always has.
    /// </summary>
    public abstract ReceivedArray? TryCreate(long bytes);

    /// <summary>The receiver of a result of type <typeparamref name="TResult"/>: an array of a primitive element type; null for anything else (which keeps the lease).</summary>
    public static ArrayReceiver? For<TResult>() => ResultArrays<TResult>.Receiver;

    /// <summary>The receiver of an argument of array type <paramref name="type"/> (as generated code names it), by the same comparisons; null for any other type.</summary>
    public static ArrayReceiver? ForArray(Type? type) =>
        type is null ? null
        : type == typeof(byte[]) ? For<byte[]>()
        : type == typeof(float[]) ? For<float[]>()
        : type == typeof(double[]) ? For<double[]>()
        : type == typeof(int[]) ? For<int[]>()
        : type == typeof(long[]) ? For<long[]>()
        : type == typeof(short[]) ? For<short[]>()
        : type == typeof(ushort[]) ? For<ushort[]>()
        : type == typeof(uint[]) ? For<uint[]>()
        : type == typeof(ulong[]) ? For<ulong[]>()
        : type == typeof(sbyte[]) ? For<sbyte[]>()
        : type == typeof(Half[]) ? For<Half[]>()
        : type == typeof(char[]) ? For<char[]>()
        : null;

    /// <summary>One receiver per result type, chosen by comparing types the JIT and NativeAOT fold to constants (no reflection).</summary>
    private static class ResultArrays<TResult>
    {
        public static readonly ArrayReceiver? Receiver =
            typeof(TResult) == typeof(byte[]) ? new ArrayReceiver<byte>()
            : typeof(TResult) == typeof(float[]) ? new ArrayReceiver<float>()
            : typeof(TResult) == typeof(double[]) ? new ArrayReceiver<double>()
            : typeof(TResult) == typeof(int[]) ? new ArrayReceiver<int>()
            : typeof(TResult) == typeof(long[]) ? new ArrayReceiver<long>()
            : typeof(TResult) == typeof(short[]) ? new ArrayReceiver<short>()
            : typeof(TResult) == typeof(ushort[]) ? new ArrayReceiver<ushort>()
            : typeof(TResult) == typeof(uint[]) ? new ArrayReceiver<uint>()
            : typeof(TResult) == typeof(ulong[]) ? new ArrayReceiver<ulong>()
            : typeof(TResult) == typeof(sbyte[]) ? new ArrayReceiver<sbyte>()
            : typeof(TResult) == typeof(Half[]) ? new ArrayReceiver<Half>()
            : typeof(TResult) == typeof(char[]) ? new ArrayReceiver<char>()
            : null;
    }
}

/// <inheritdoc cref="ArrayReceiver"/>
internal sealed class ArrayReceiver<T> : ArrayReceiver
    where T : unmanaged
{
    public override ReceivedArray? TryCreate(long bytes)
    {
        int size = Unsafe.SizeOf<T>();
        return bytes >= 0 && bytes % size == 0 && bytes / size <= Array.MaxLength
            ? new ReceivedArray<T>(GC.AllocateUninitializedArray<T>((int)(bytes / size)))
            : null;
    }
}

/// <summary>A payload's array while its bytes arrive (<see cref="ArrayReceiver"/>).</summary>
internal abstract class ReceivedArray
{
    /// <summary>The array's bytes, written in order as they arrive.</summary>
    public abstract Span<byte> Bytes { get; }

    public abstract long ByteLength { get; }
}

/// <inheritdoc cref="ReceivedArray"/>
internal sealed class ReceivedArray<T>(T[] array) : ReceivedArray
    where T : unmanaged
{
    public T[] Array => array;

    public override Span<byte> Bytes => MemoryMarshal.AsBytes(array.AsSpan());

    public override long ByteLength => (long)array.Length * Unsafe.SizeOf<T>();
}
